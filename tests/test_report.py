"""`opticam report`: reading runs, aggregates in tables (hand-computed), the paper's values,
Markdown/CSV/LaTeX, figures, index.html, exit codes.

Runs come from tests/_runs.py (schema-exact, the job's layout). Expected numbers below are
worked out by hand from SPEC §4's definitions, not by calling a formula."""

from __future__ import annotations

import html.parser
import json
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from opticam_core.metrics import aggregate
from pipeline.cli import main as opticam
from pipeline.report import aggregate_rows, open_run, read_rows, row_counts
from pipeline.report.aggregates import (
    Aggregator,
    counts_from_indices,
    per_image_frame,
    resample_indices,
)
from pipeline.report.figures import DPI, preprocess_image
from pipeline.report.paper import paper_value, paper_values
from pipeline.report.runs import RunNotFound, list_runs, previous_run
from pipeline.report.tables import (
    FIGURE2,
    build_tables,
    latex_escape,
    runtime_table,
    table_latex,
    table_markdown,
    tables_frame,
)
from pipeline.schema import RESULTS
from tests._runs import make_run

# --------------------------------------------------------------------------------------------
# A 4-image run with hand-picked values (see the numbers worked out in the tests)

P = [0.5, 0.8, 0.4, 0.9]
O = {"fakecam": [0.5, 0.8, 0.4, 0.9], "gradcam": [0.25, 0.9, None, 0.45], "opticam": [0.75, 0.8, 0.1, 0.95]}


def _hand_edit(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    idx = df["sample_id"].str[-4:].astype(int)
    for m, o in O.items():
        for i in range(4):
            sel = (df["method"] == m) & (idx == i) & df["error"].isna()
            df.loc[sel, "p"] = P[i]
            df.loc[sel, "o"] = o[i]
            df.loc[sel, "pred"] = [0, 1, 2, 4][i]
            if i != 1:  # image 1 has no box: its localization fields stay null
                df.loc[sel, "o_box"] = [0.1, None, 0.2, 0.9][i]
                df.loc[sel, "o_not_box"] = [0.5, None, 0.6, 0.3][i]
    opt = (df["method"] == "opticam").to_numpy()
    for i in range(4):
        s = opt & (idx == i).to_numpy()
        r = df.index[s][0]
        df.at[r, "insertion"] = [0.2, 0.4, 0.6, 0.8][i]
        df.at[r, "deletion"] = [0.1, 0.1, 0.2, 0.2][i]
        if i == 1:
            continue
        df.at[r, "loc_iou"] = {0: 0.6, 2: 0.3, 3: 0.9}[i]
        df.at[r, "energy"] = {0: 0.5, 2: 0.2, 3: 0.8}[i]
        df.at[r, "recall"] = {0: 0.5, 2: 0.6, 3: 0.2}[i]
        df.at[r, "pointing"] = {0: True, 2: False, 3: True}[i]
        df.at[r, "sm"] = {0: 1.0, 2: 2.0, 3: 0.5}[i]
        df.at[r, "box_iou"] = {0: [0.8] * 50 + [0.2] * 50, 2: [0.4] * 100, 3: [0.6] * 100}[i]
        df.at[r, "o_box_and_map"] = {0: 0.25, 2: 0.4, 3: 0.45}[i]
        df.at[r, "o_map_minus_box"] = {0: 0.5, 2: 0.2, 3: 0.95}[i]
    return df


@pytest.fixture
def hand_run(tmp_path):
    return make_run(tmp_path / "out", "hand", datasets={"imagenet-val": 4}, models=("resnet50",),
                    methods=("fakecam", "gradcam", "opticam"), failed=[("resnet50", "gradcam", 2)],
                    constant=[("resnet50", "gradcam", 3)], no_box=(1,), edit=_hand_edit)


def _cells(run_spec, resamples=0):
    rows = read_rows(run_spec.uri)
    return rows, aggregate_rows(rows, resamples=resamples, aggregate=aggregate)


def _value(cells, method, metric, subset="all"):
    hit = cells[(cells["method"] == method) & (cells["metric"] == metric) & (cells["subset"] == subset)]
    assert len(hit) == 1, (method, metric, subset, len(hit))
    return hit.iloc[0]


# --------------------------------------------------------------------------------------------
# Reading runs


def test_reads_the_job_layout_without_hive_partitioning(tmp_path):
    spec = make_run(tmp_path / "out", "r1", datasets={"imagenet-val": 5, "toy": 3}, models=("resnet50", "vgg16_bn"))
    assert (spec.path / "dataset=toy" / "model=vgg16_bn" / "part-0.parquet").exists()
    run = open_run(spec.uri)
    assert run.run_id == "r1" and len(run.files) == 4
    rows = read_rows(run)
    assert len(rows) == len(spec.rows) == (5 + 3) * 2 * 3
    # the columns hold the row values as plain strings, not partition categories
    assert set(rows["dataset"]) == {"imagenet-val", "toy"} and rows["dataset"].dtype != "category"
    assert int(rows["error"].notna().sum()) == 2  # one planted failure per dataset
    assert "map_png" not in rows and "insertion_curve" not in rows
    with_maps = read_rows(run, maps=True)
    png = with_maps["map_png"].dropna().iloc[0]
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # an output root opens its latest run
    assert open_run(str(spec.output)).run_id == "r1"
    assert run.datasets()["toy"]["uri"] == str(spec.samples["toy"])


def test_no_run_raises(tmp_path):
    with pytest.raises(RunNotFound):
        open_run(str(tmp_path / "nothing"))


def test_duplicates_keep_the_successful_newest_row_and_missing_columns_are_null(tmp_path):
    spec = make_run(tmp_path / "out", "r1", datasets={"toy": 3}, methods=("gradcam",), failed=[], constant=[])
    dup = spec.rows.iloc[[0]].copy()
    dup["error"] = "retried and failed"
    dup["o"] = None
    dup["created"] = dup["created"] - pd.Timedelta(seconds=30)
    newer = spec.rows.iloc[[1]].copy()
    newer["o"] = 0.123
    newer["created"] = newer["created"] + pd.Timedelta(seconds=30)
    extra = spec.path / "dataset=toy" / "model=resnet50" / "part-1.parquet"
    # an older writer's file without the Opti-CAM history column
    t = pa.Table.from_pandas(pd.concat([dup, newer]), schema=RESULTS, preserve_index=False).drop_columns(["objective_history"])
    pq.write_table(t, extra)
    rows = read_rows(spec.uri, curves=True)
    assert len(rows) == 3
    first = rows[rows["sample_id"] == spec.rows.iloc[0]["sample_id"]].iloc[0]
    assert first["error"] is None or pd.isna(first["error"])
    assert first["o"] == pytest.approx(spec.rows.iloc[0]["o"])
    second = rows[rows["sample_id"] == spec.rows.iloc[1]["sample_id"]].iloc[0]
    assert second["o"] == pytest.approx(0.123)


def test_previous_run_by_started_time(tmp_path):
    from datetime import datetime, timezone

    out = tmp_path / "out"
    for rid, day in (("b", 3), ("a", 1), ("c", 2)):  # names deliberately out of time order
        make_run(out, rid, datasets={"toy": 2}, methods=("gradcam",), started=datetime(2026, 1, day, tzinfo=timezone.utc))
    runs = list_runs(str(out))
    assert [r.run_id for r in runs] == ["a", "c", "b"]
    assert previous_run(open_run(str(out / "run=b"))).run_id == "c"
    assert previous_run(open_run(str(out / "run=c"))).run_id == "a"
    assert previous_run(open_run(str(out / "run=a"))) is None
    assert open_run(str(out)).run_id == "b"


# --------------------------------------------------------------------------------------------
# Aggregates (hand-computed)


def test_classification_aggregates_by_hand(hand_run):
    rows, cells = _cells(hand_run)
    # Fake-CAM: o = p everywhere → no drop, no gain, no increase
    for metric in ("AD", "AG", "AI"):
        assert _value(cells, "fakecam", metric)["value"] == pytest.approx(0.0, abs=1e-9)
    # Grad-CAM: image 2 failed; terms AD (0.5, 0, 0.5), AG (0, 0.5, 0), AI (0, 1, 0); the constant map counts
    g = {m: _value(cells, "gradcam", m) for m in ("AD", "AG", "AI")}
    assert g["AD"]["value"] == pytest.approx(100 / 3)
    assert g["AG"]["value"] == pytest.approx(50 / 3)
    assert g["AI"]["value"] == pytest.approx(100 / 3)
    assert g["AD"]["n"] == 3 and g["AD"]["failed"] == 1
    # Opti-CAM: AD (0, 0, 0.75, 0), AG (0.5, 0, 0, 0.5), AI (1, 0, 0, 1)
    assert _value(cells, "opticam", "AD")["value"] == pytest.approx(18.75)
    assert _value(cells, "opticam", "AG")["value"] == pytest.approx(25.0)
    assert _value(cells, "opticam", "AI")["value"] == pytest.approx(50.0)
    assert _value(cells, "opticam", "I")["value"] == pytest.approx(50.0)
    assert _value(cells, "opticam", "D")["value"] == pytest.approx(15.0)
    assert _value(cells, "opticam", "AD")["failed"] == 0


def test_localization_aggregates_by_hand_exclude_the_image_without_box(hand_run):
    _, cells = _cells(hand_run)
    v = {m: _value(cells, "opticam", m) for m in ("OM", "LE", "F1", "BA", "SP", "EP", "SM")}
    # boxed images 0, 2, 3: IoU ≥ 0.5 → (1, 0, 1); pred = label → (1, 1, 0)
    assert v["OM"]["value"] == pytest.approx(200 / 3)
    assert v["LE"]["value"] == pytest.approx(100 / 3)
    assert v["F1"]["value"] == pytest.approx(100 * (0.5 + 0.3 + 0.32) / 3)
    assert v["SP"]["value"] == pytest.approx(200 / 3)
    assert v["EP"]["value"] == pytest.approx(50.0)
    assert v["SM"]["value"] == pytest.approx(3.5 / 3)
    # BA: best threshold per δ of the dataset mean: δ=.3 → 1, δ=.5 → 2/3, δ=.7 → 1/3
    assert v["BA"]["value"] == pytest.approx(100 * (1 + 2 / 3 + 1 / 3) / 3)
    for m in v.values():
        assert m["n"] == 3 and m["excluded"] == 1


def test_box_study_by_hand(hand_run):
    _, cells = _cells(hand_run)
    assert _value(cells, "opticam", "AD@box_and_map", "boxed")["value"] == pytest.approx(100 / 3)
    assert _value(cells, "opticam", "AD@map_minus_box", "boxed")["value"] == pytest.approx(50 / 3)
    assert _value(cells, "opticam", "AG@map_minus_box", "boxed")["value"] == pytest.approx(50 / 3)
    # the S column of the box study: only images with a box (0, 2, 3)
    assert _value(cells, "opticam", "AD", "boxed")["value"] == pytest.approx(25.0)
    assert _value(cells, "opticam", "AI", "boxed")["value"] == pytest.approx(200 / 3)
    assert _value(cells, "opticam", "AD", "boxed")["n"] == 3
    # method-free rows, once per image
    assert _value(cells, "box", "AD@box", "boxed")["value"] == pytest.approx(100 * 1.3 / 3)
    assert _value(cells, "not_box", "AD@not_box", "boxed")["value"] == pytest.approx(100 * (0.6 / 0.9) / 3)
    assert _value(cells, "not_box", "AI@not_box", "boxed")["value"] == pytest.approx(100 / 3)
    assert _value(cells, "box", "AD@box", "boxed")["n"] == 3


def test_tables_mark_best_and_carry_counts_and_paper_values(hand_run):
    rows, cells = _cells(hand_run)
    tables = build_tables(cells, row_counts(rows), splits={"imagenet-val": "val"})
    by = {t.spec.key: t for t in tables}
    f2 = by["fig2"]
    assert f2.rows == ["fakecam", "gradcam", "opticam"]
    ad = next(c for c in FIGURE2.columns if c.metric == "AD")
    # Fake-CAM has the lowest AD (0) but is excluded from "best"; Opti-CAM (18.75) beats Grad-CAM (33.3)
    assert not f2.cell("fakecam", ad).best and f2.cell("opticam", ad).best and not f2.cell("gradcam", ad).best
    assert f2.ok["gradcam"] == 3 and f2.failed["gradcam"] == 1
    assert f2.cell("gradcam", ad).paper == pytest.approx(12.2)
    md = table_markdown(f2)
    assert "**18.8**" in md and "(paper 1.5)" in md and "n=3" in md
    frame = tables_frame(tables)
    row = frame[(frame["figure"] == "fig2") & (frame["method"] == "opticam") & (frame["metric"] == "AD")].iloc[0]
    assert row["gap"] == pytest.approx(18.75 - 1.5) and row["best"] and row["n"] == 4
    f4 = by["fig4"]
    assert f4.rows[:2] == ["box", "not_box"]
    # the paper's Figure 4 is for VGG16: no paper values for this ResNet50 run
    assert not f4.has_paper


def test_paper_values_only_for_the_papers_setting():
    assert paper_value("fig2", "imagenet-val", "vgg16", "opticam", "AG", split="val") == pytest.approx(71.2)
    assert paper_value("fig2", "imagenet-val", "deit_base_patch16_224", "gradcam", "AD", split="val") == pytest.approx(33.5)
    assert paper_value("fig3", "imagenet_val", "resnet50", "fakecam", "SP", split="val") == pytest.approx(99.8)
    assert paper_value("fig4", "imagenet-val", "vgg16_bn", "box", "AD@box", split="val") == pytest.approx(67.2)
    assert paper_value("fig4", "imagenet-val", "vgg16_bn", "opticam", "AI@map_minus_box", split="val") == pytest.approx(47.1)
    assert paper_value("fig2", "kvasir", "resnet50", "opticam", "AD", split="test") is None
    assert paper_value("fig2", "imagenet-train", "resnet50", "opticam", "AD", split="train") is None
    assert paper_value("fig2", "imagenet-val", "efficientnet_lite0", "opticam", "AD", split="val") is None
    # the full paper's tables, not only the poster's: Tables 1-2 (AD/AG/AI) and 3 (I/D) have
    # 12 CNN rows (Ablation-CAM, HiRes-CAM, LIME, GradSHAP included) and 14 transformer rows
    # (RawAtt, Rollout, TIBAV; no Ablation-CAM); Table 3 has no HiRes-CAM row
    fig2 = {k for k in paper_values() if k[0] == "fig2"}
    assert len(fig2) == (12 + 14) * 2 * 3 + (11 + 13) * 2 * 2
    assert paper_value("fig2", "imagenet-val", "resnet50", "hirescam", "AD", split="val") == pytest.approx(12.2)
    assert paper_value("fig2", "imagenet-val", "vit_base_patch16_224", "tibav", "I", split="val") == pytest.approx(66.1)
    assert paper_value("fig3", "imagenet-val", "deit_base_patch16_224", "rollout", "SP", split="val") == pytest.approx(36.5)
    assert paper_value("fig2", "imagenet-val", "vgg16_bn", "ablationcam", "D", split="val") == pytest.approx(11.4)
    assert paper_value("timing", "imagenet-val", "vgg16_bn", "lime", "seconds", split="val") == pytest.approx(0.67 / 8)


def test_bootstrap_intervals_are_seeded_and_the_vectorised_path_matches(hand_run):
    rows = read_rows(hand_run.uri)
    a = aggregate_rows(rows, resamples=40, seed=1, aggregate=aggregate)
    b = aggregate_rows(rows, resamples=40, seed=1, aggregate=aggregate)
    c = aggregate_rows(rows, resamples=40, seed=2, aggregate=aggregate)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["lo"].fillna(0), c["lo"].fillna(0))
    fin = a[np.isfinite(a["lo"])]
    assert len(fin) > 50
    assert (fin["lo"] <= fin["value"] + 1e-9).all() and (fin["value"] <= fin["hi"] + 1e-9).all()
    # Fake-CAM's o = p: every resample gives exactly 0
    z = a[(a["method"] == "fakecam") & (a["metric"] == "AD") & (a["subset"] == "all")].iloc[0]
    assert z["lo"] == 0 and z["hi"] == 0

    # the vectorised path (`weights`: one call for all resamples) equals one call per resample
    base = aggregate
    frame = per_image_frame(rows[(rows["method"] == "opticam")])
    idx = resample_indices(len(frame), 25, np.random.default_rng(0))
    assert counts_from_indices(idx, len(frame)).sum(1).tolist() == [len(frame)] * 25
    loop = Aggregator(base, vectorised=False).replicates([frame], idx)[0]

    def by_repeat(values, *, weights=None, **kw):  # weights as row repetitions, the definition
        if weights is None:
            return base(values, **kw)
        outs = [base(values.take(np.repeat(np.arange(len(values)), w.astype(int))), **kw) for w in weights]
        return {k: type(outs[0][k])(np.array([o[k].value for o in outs]), outs[0][k].n, outs[0][k].excluded)
                for k in outs[0]}

    for vec_agg in (Aggregator(by_repeat), Aggregator(aggregate)):
        assert vec_agg.vectorised
        vec = vec_agg.replicates([frame], idx)[0]
        for k in ("AD", "AG", "AI", "I", "BA", "OM", "F1", "SM"):
            np.testing.assert_allclose(vec[k], loop[k], rtol=1e-9, atol=1e-9, equal_nan=True)



def test_bootstrap_intervals_are_the_percentiles_of_the_resampled_definitions(tmp_path):
    """The intervals recomputed without the report's code: the same resamples (the documented
    draw: one generator per (dataset, model, method, subset), seeded by the run seed and the
    CRC-32s of those names; R×N indices with replacement over the group's rows by sample id),
    SPEC §4's AD/AG/AI on each, and numpy's 2.5 and 97.5 percentiles."""
    spec = make_run(tmp_path / "out", "boot", datasets={"toy": 30}, methods=("gradcam", "opticam"),
                    failed=[("resnet50", "opticam", 4)], constant=[])
    rows = read_rows(spec.uri)
    resamples, seed = 60, 7
    cells = aggregate_rows(rows, resamples=resamples, seed=seed, aggregate=aggregate)
    checked = 0
    for method in ("gradcam", "opticam"):
        ok = rows[(rows["method"] == method) & rows["error"].isna()].sort_values("sample_id")
        p, o = ok["p"].to_numpy(float), ok["o"].to_numpy(float)
        assert np.isfinite(p).all() and np.isfinite(o).all() and ((p > 0) & (p < 1)).all()
        names = ["toy", "resnet50", method, "all"]
        rng = np.random.default_rng([seed, *(zlib.crc32(n.encode()) for n in names)])
        idx = rng.integers(0, len(ok), size=(resamples, len(ok)))
        pr, orr = p[idx], o[idx]
        replicates = {
            "AD": 100 * (np.maximum(pr - orr, 0) / pr).mean(1),
            "AG": 100 * (np.maximum(orr - pr, 0) / (1 - pr)).mean(1),
            "AI": 100 * (pr < orr).mean(1),
        }
        for metric, reps in replicates.items():
            cell = _value(cells, method, metric)
            assert cell["n"] == len(ok) and cell["excluded"] == 0
            lo, hi = np.percentile(reps, [2.5, 97.5])
            assert lo < hi  # a degenerate interval would compare nothing
            np.testing.assert_allclose([cell["lo"], cell["hi"]], [lo, hi], rtol=1e-12, atol=1e-9)
            checked += 1
    assert checked == 6

def test_runtime_table(tmp_path):
    def edit(df):
        df = df.copy()
        df.loc[df["method"] == "gradcam", "seconds"] = [0.1, 0.2, 0.3, 0.6][: int((df["method"] == "gradcam").sum())]
        return df

    spec = make_run(tmp_path / "out", "rt", datasets={"imagenet-val": 4}, methods=("gradcam", "opticam"),
                    failed=[], constant=[], edit=edit)
    rt = runtime_table(read_rows(spec.uri), splits={"imagenet-val": "val"})
    g = rt[rt["method"] == "gradcam"].iloc[0]
    assert g["images"] == 4 and g["mean_s"] == pytest.approx(0.3) and g["median_s"] == pytest.approx(0.25)
    assert g["total_s"] == pytest.approx(1.2) and g["paper_s"] == pytest.approx(0.03 / 8)


# --------------------------------------------------------------------------------------------
# LaTeX and Markdown structure


def _latex_row_width(line: str) -> int:
    body = line.rstrip().removesuffix("\\\\")
    cells = re.split(r"(?<!\\)&", body)
    width = 0
    for c in cells:
        m = re.search(r"\\multicolumn\{(\d+)\}", c)
        width += int(m.group(1)) if m else 1
    return width


def _check_latex(tex: str, expected_tables: int) -> None:
    assert tex.count("\\begin{table}") == tex.count("\\end{table}") == expected_tables
    assert tex.count("\\begin{tabular}") == tex.count("\\end{tabular}") == expected_tables
    for block in re.findall(r"\\begin\{tabular\}\{([^}]*)\}(.*?)\\end\{tabular\}", tex, flags=re.S):
        spec, body = block
        ncol = len(spec)
        rows = [ln for ln in body.strip().splitlines() if ln.strip() and not ln.strip().startswith("\\hline")]
        assert rows
        for ln in rows:
            assert ln.rstrip().endswith("\\\\"), ln
            assert _latex_row_width(ln) == ncol, (ln, ncol)
    # balanced braces and math, and no unescaped specials in text
    depth = 0
    for i, ch in enumerate(tex):
        if ch in "{}" and (i == 0 or tex[i - 1] != "\\"):
            depth += 1 if ch == "{" else -1
            assert depth >= 0
    assert depth == 0
    for line in tex.splitlines():
        if line.startswith("%"):
            continue
        assert len(re.findall(r"(?<!\\)\$", line)) % 2 == 0, line
        text = re.sub(r"\$[^$]*\$", "", line)  # math is allowed its _ and ^
        assert not re.search(r"(?<!\\)[_%#]", text), line
        assert "∖" not in line and "↓" not in line


def test_latex_is_structurally_valid_with_awkward_names(tmp_path):
    spec = make_run(tmp_path / "out", "tex", datasets={"my_data&set%#1": 5}, models=("vit_base_patch16_224",),
                    methods=("fakecam", "gradcam", "opticam"))
    rows = read_rows(spec.uri)
    cells = aggregate_rows(rows, resamples=5, aggregate=aggregate)
    tables = build_tables(cells, row_counts(rows))
    assert {t.spec.key for t in tables} == {"fig2", "fig3", "fig4"}
    tex = "\n".join(table_latex(t) for t in tables)
    _check_latex(tex, len(tables))
    assert "my\\_data\\&set\\%\\#1" in tex and "vit\\_base\\_patch16\\_224" in tex
    assert latex_escape("a_b^c~d\\e{f}") == "a\\_b\\textasciicircum{}c\\textasciitilde{}d\\textbackslash{}e\\{f\\}"
    # Markdown: every line of a table has the header's number of columns
    for t in tables:
        lines = [ln for ln in table_markdown(t).splitlines() if ln.startswith("|")]
        widths = {len(re.split(r"(?<!\\)\|", ln)) for ln in lines}
        assert len(widths) == 1 and len(lines) == len(t.rows) + 2


# --------------------------------------------------------------------------------------------
# The whole report: files, figures, index.html, exit codes


class _Refs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href") and v and not v.startswith("#"):
                self.refs.append(v)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_report_files_figures_and_html(tmp_path):
    spec = make_run(tmp_path / "out", "full", datasets={"imagenet-val": 8}, models=("vgg16_bn",),
                    methods=("fakecam", "gradcam", "scorecam", "opticam"))
    out = tmp_path / "report"
    rc = opticam(["report", spec.uri, "--out", str(out), "--bootstrap", "10", "--grid-images", "3"])
    assert rc == 0
    for name in ("index.html", "report.md", "tables.md", "tables.tex", "figure2.csv", "figure3.csv", "figure4.csv",
                 "aggregates.csv", "runtime.csv", "row_counts.csv", "failures.csv", "summary.json"):
        assert (out / name).is_file(), name
    tag = "imagenet-val_vgg16_bn"
    assert _png_size(out / "figures" / f"bars_{tag}.png") == (12 * DPI, 4 * DPI)
    assert _png_size(out / "figures" / f"curves_{tag}.png") == (10 * DPI, 4 * DPI)
    assert _png_size(out / "figures" / f"convergence_{tag}.png") == (10 * DPI, 4 * DPI)
    w, h = _png_size(out / "figures" / f"maps_{tag}.png")
    assert (w, h) == (round(5 * 1.6 * DPI), round((3 * 1.6 + 0.4) * DPI))
    # the grid's first column shows the photo: its pixels are not the figure's white background
    with Image.open(out / "figures" / f"maps_{tag}.png") as im:
        px = np.asarray(im.convert("RGB"), dtype=float)
    cell = px[int(0.45 * DPI):int(1.4 * DPI), int(0.3 * DPI):int(1.5 * DPI)]
    assert (cell.min(-1) > 245).mean() < 0.2  # mostly white would be "image unavailable"

    refs = _Refs()
    refs.feed((out / "index.html").read_text())
    assert any(r.endswith(".png") for r in refs.refs)
    for r in refs.refs:
        assert (out / r).is_file(), r
    page = (out / "index.html").read_text()
    assert "Figure 2" in page and "paper 71.2" in page  # VGG16 Opti-CAM AG in the paper
    f2 = pd.read_csv(out / "figure2.csv")
    assert set(f2["method"]) == {"fakecam", "gradcam", "scorecam", "opticam"}
    assert f2.loc[(f2["method"] == "gradcam") & (f2["metric"] == "AD"), "failed_rows"].item() == 1
    assert f2["n"].min() > 0 and f2["ci_low"].notna().all()
    _check_latex((out / "tables.tex").read_text(), 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == 1 and summary["rows"] == 8 * 4
    counts = pd.read_csv(out / "row_counts.csv").set_index("method")
    assert counts.loc["gradcam", ["rows", "ok", "failed", "constant"]].tolist() == [8, 7, 1, 1]
    assert counts.loc["opticam", "constant"] == 0


def test_report_never_imports_ray(tmp_path):
    import subprocess
    import sys

    spec = make_run(tmp_path / "out", "noray", datasets={"toy": 3}, methods=("gradcam", "opticam"), maps=False)
    code = ("import sys\nfrom pipeline.cli import main\n"
            f"rc = main(['report', {spec.uri!r}, '--bootstrap', '3', '--out', {str(tmp_path / 'r')!r}])\n"
            "assert rc == 0, rc\nassert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]


def test_preprocessing_geometry_matches_torchvision():
    tv = pytest.importorskip("torchvision.transforms")
    import io

    rng = np.random.default_rng(0)
    img = (rng.uniform(size=(300, 451, 3)) * 255).astype(np.uint8)
    img[100:140, 200:260] = [255, 0, 0]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    ours = preprocess_image(buf.getvalue())
    ref = tv.Compose([tv.Resize(256), tv.CenterCrop(224), tv.ToTensor()])(Image.fromarray(img)).permute(1, 2, 0).numpy()
    assert ours.shape == (224, 224, 3)
    red = lambda a: (a[..., 0] > 0.8) & (a[..., 1] < 0.2)  # noqa: E731  the red patch lands in the same place
    assert (red(ours) ^ red(ref)).mean() < 0.01
    assert np.abs(ours - ref).mean() < 0.08


def test_exit_codes(tmp_path):
    spec = make_run(tmp_path / "out", "x", datasets={"toy": 3}, methods=("gradcam",), failed=[], constant=[])
    assert opticam(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert opticam(["report", spec.uri, "--fail-on", "AD=2"]) == 2           # thresholds need --against
    assert opticam(["report", spec.uri, "--against", "previous", "--fail-on", "AD"]) == 2   # not METRIC=X
    assert opticam(["report", spec.uri, "--against", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    # the first run of a nightly series has nothing before it: a report, no comparison, success
    assert opticam(["report", spec.uri, "--against", "previous", "--fail-on", "AD=1", "--no-figures",
                    "--bootstrap", "0", "--out", str(tmp_path / "r")]) == 0
    assert not (tmp_path / "r" / "comparison.csv").exists()
    # default output folder: beside the run, outside its folder
    assert opticam(["report", spec.uri, "--no-figures", "--bootstrap", "0"]) == 0
    assert (spec.output / "report=x" / "index.html").is_file()
    assert not list(spec.path.glob("**/*.html"))
