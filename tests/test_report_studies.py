"""`opticam report`'s studies (Tables 4, 6, A.9, A.12, A.13, A.14, Fig. A4): which rows make
which table, numbers worked out by hand, the paper's values only in the paper's setting, and the
paper's own contradictions said under the tables.

Runs come from tests/_runs.py with hand-set values (`edit=`); no file under ../shared is read."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from opticam_core.metrics import aggregate
from pipeline.report import (
    aggregate_rows,
    build_report,
    compare_rows,
    read_rows,
    row_counts,
)
from pipeline.report.figures import DPI
from pipeline.report.paper import base_model, paper_values
from pipeline.report.studies import (
    NOTE_ADCC,
    NOTE_AOPC_R50,
    NOTE_BASELINES,
    NOTE_ITERATIONS,
    NOTE_LAYER42,
    selectivity_frame,
    study_tables,
    target_cells,
)
from pipeline.report.tables import (
    build_tables,
    runtime_table,
    table_latex,
    table_markdown,
    tables_frame,
)
from pipeline.schema import RESULTS
from tests._runs import make_run
from tests.test_report import _check_latex

P = [0.5, 0.8, 0.4, 0.9]
PRED = [0, 1, 2, 4]  # labels are 0, 1, 2, 3: image 3 is misclassified


def _index(df: pd.DataFrame) -> pd.Series:
    return df["sample_id"].str[-4:].astype(int)


def _set(df: pd.DataFrame, sel, column: str, values) -> None:
    idx = _index(df)
    for i, v in enumerate(values):
        df.loc[sel & (idx == i), column] = v


def _tables(spec, *, manifest=None, aggregate_fn=aggregate, splits=None):
    rows = read_rows(spec.uri)
    cells = aggregate_rows(rows, resamples=0, aggregate=aggregate_fn)
    cells = pd.concat([cells, target_cells(rows, resamples=0)], ignore_index=True)
    counts = row_counts(rows)
    splits = splits if splits is not None else {"imagenet-val": "val"}
    return rows, cells, counts, study_tables(rows, cells, counts, splits=splits, manifest=manifest or spec.manifest)


def _only(tables, key, **kw):
    hit = [t for t in tables if t.spec.key == key and all(getattr(t, k) == v for k, v in kw.items())]
    assert len(hit) == 1, (key, kw, [(t.spec.key, t.model, t.part) for t in tables])
    return hit[0]


def _cell(t, row, metric):
    col = next(c for c in t.spec.columns if c.metric == metric)
    return t.cell(row, col)


# --------------------------------------------------------------------------------------------
# Table A.9: maps for other classes


def _targets(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for m in ("gradcam", "opticam"):
        sel = df["method"] == m
        _set(df, sel, "p", P)
        _set(df, sel, "pred", PRED)
        _set(df, sel, "o", [0.5, 0.8, 0.4, 0.9])
    top1 = df.copy()
    top1["target"] = "top1"
    _set(top1, top1["method"] == "opticam", "o", [0.25, 0.9, 0.4, 0.45])
    _set(top1, top1["method"] == "gradcam", "o", [0.5, 0.8, 0.2, 0.95])
    least = df.copy()
    least["target"] = "least"
    _set(least, least["method"] == "opticam", "o", [0.1, 0.4, 0.2, 0.3])
    least = least[least["method"] == "opticam"]
    return pd.concat([df, top1, least], ignore_index=True)


def test_table_a9_by_hand_with_the_misclassified_column(tmp_path):
    spec = make_run(tmp_path / "out", "a9", datasets={"imagenet-val": 4}, models=("resnet50",),
                    methods=("gradcam", "opticam"), failed=[], constant=[], edit=_targets)
    rows, cells, counts, tables = _tables(spec)
    assert set(rows["target"]) == {"label", "top1", "least"}
    t = _only(tables, "tableA9")
    assert [c.label for c in t.spec.columns][:3] == ["GT AD↓", "GT AG↑", "GT AI↑"]
    assert {c.group[0] for c in t.spec.columns} == {"GT", "Most", "Least", "Most (misclassified only)"}
    assert t.rows == ["gradcam", "opticam"]
    # Opti-CAM, top-1 maps: AD terms (0.5, 0, 0, 0.5), AG (0, 0.5, 0, 0), AI (0, 1, 0, 0)
    assert _cell(t, "opticam", "AD:top1").value == pytest.approx(25.0)
    assert _cell(t, "opticam", "AG:top1").value == pytest.approx(12.5)
    assert _cell(t, "opticam", "AI:top1").value == pytest.approx(25.0)
    # misclassified only: image 3 (pred 4, label 3): o 0.45 of p 0.9
    mis = _cell(t, "opticam", "AD:misclassified")
    assert mis.value == pytest.approx(50.0) and mis.n == 1
    assert _cell(t, "gradcam", "AG:misclassified").value == pytest.approx(50.0)
    # least: only Opti-CAM has it; AD terms (0.8, 0.5, 0.5, 2/3)
    assert _cell(t, "opticam", "AD:least").value == pytest.approx(100 * (0.8 + 0.5 + 0.5 + 0.6 / 0.9) / 4)
    assert _cell(t, "gradcam", "AD:least").missing
    # GT: the label's maps, o = p → no drop
    assert _cell(t, "opticam", "AD:label").value == pytest.approx(0.0)
    # the paper's values (ResNet-50, ImageNet val), its two-decimal ADs shown with two decimals
    assert _cell(t, "opticam", "AD:top1").paper == pytest.approx(12.01)
    assert _cell(t, "gradcam", "AD:misclassified").paper == pytest.approx(37.84)
    assert "(paper 12.01)" in table_markdown(t)
    # the main tables read only the label's maps: Figure 2's Opti-CAM AD is 0 (o = p), not the mixture
    f2 = next(x for x in build_tables(cells, counts, splits={"imagenet-val": "val"}) if x.spec.key == "fig2")
    ad = next(c for c in f2.spec.columns if c.metric == "AD")
    assert f2.cell("opticam", ad).value == pytest.approx(0.0) and f2.ok["opticam"] == 4
    assert counts[counts["target"] == "top1"]["ok"].sum() == 8
    # runtime: maps for the label only
    assert runtime_table(rows)["images"].tolist() == [4, 4]


def test_no_study_rows_no_study_tables(tmp_path):
    spec = make_run(tmp_path / "out", "plain", datasets={"imagenet-val": 5}, models=("resnet50",),
                    methods=("fakecam", "gradcam", "opticam"))
    _, _, _, tables = _tables(spec)
    assert tables == []
    assert selectivity_frame(read_rows(spec.uri)).empty


# --------------------------------------------------------------------------------------------
# Tables 6 and A.12: Opti-CAM variants


VARIANTS = {"opticam": {"iterations": 50}, "opticam:diff": {"iterations": 50, "objective": "diff"},
            "opticam:maskmax": {"iterations": 50, "normalization": "max"},
            "opticam:iomask": {"iterations": 50, "objective": "iomask"},
            "opticam:iodiff100": {"iterations": 100, "objective": "iodiff"}}


def _variants(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for m, opts in VARIANTS.items():
        df.loc[df["method"] == m, "options"] = json.dumps(opts)
    for m, o in (("scorecam", [0.25, 0.8, 0.4, 0.9]), ("opticam:diff", [0.5, 0.9, 0.2, 0.9])):
        sel = df["method"] == m
        _set(df, sel, "p", P)
        _set(df, sel, "o", o)
    return df


def test_tables_6_and_a12_from_the_variants_options(tmp_path):
    spec = make_run(tmp_path / "out", "abl", datasets={"imagenet-val": 4}, models=("vgg16_bn",),
                    methods=("scorecam", *VARIANTS), failed=[], constant=[], edit=_variants)
    config = {**spec.manifest["config"], "datasets": [{"name": "imagenet-val", "subset": {"size": 1000, "seed": 3}}]}
    _, _, _, tables = _tables(spec, manifest={**spec.manifest, "config": config})
    t6, a12 = _only(tables, "table6"), _only(tables, "tableA12")
    assert t6.caption.startswith("Setting: imagenet-val (val), class-balanced subset of 1000 (seed 3), 4 images")
    assert t6.rows == ["scorecam", "opticam", "opticam:diff", "opticam:maskmax"]  # baselines, then the paper's order
    assert [t6.label(m) for m in t6.rows[1:]] == ["Opti-CAM: Mask / Range, 50 it.", "Opti-CAM: Diff / Range, 50 it.",
                                                  "Opti-CAM: Mask / Max, 50 it."]
    assert a12.rows == ["scorecam", "opticam", "opticam:diff", "opticam:iomask", "opticam:iodiff100"]
    assert a12.label("opticam:iodiff100") == "Opti-CAM: IODiff / Range, 100 it."
    # Diff's AD by hand: terms (0, 0, 0.5, 0) → 12.5; the paper's Diff/Range at 50 iterations: 7.1
    c = _cell(t6, "opticam:diff", "AD")
    assert c.value == pytest.approx(12.5) and c.paper == pytest.approx(7.1)
    assert _cell(t6, "opticam:maskmax", "AG").paper == pytest.approx(66.2)
    assert _cell(a12, "opticam:iomask", "AI").paper == pytest.approx(99.7)
    # 100 iterations is not the paper's setting: no value beside it, and a note says why
    assert _cell(a12, "opticam:iodiff100", "AD").paper is None and NOTE_ITERATIONS in a12.notes
    # baselines: the table's own numbers (1k subset), not Table 1's (13.5)
    assert _cell(t6, "scorecam", "AD").paper == pytest.approx(12.5)
    assert _cell(t6, "scorecam", "AD").value == pytest.approx(100 * 0.5 / 4)
    assert NOTE_BASELINES in t6.notes and NOTE_LAYER42 in t6.notes
    md = table_markdown(t6)
    assert "Opti-CAM: Diff / Range, 50 it." in md and "Note: " in md and "Opti-CAM 50, 100 iterations" in md
    # another dataset: the same tables, no paper values
    _, _, _, other = _tables(spec, splits={"imagenet-val": "train"})
    assert not _only(other, "table6").has_paper and _only(other, "table6").notes == []


# --------------------------------------------------------------------------------------------
# Table A.13 (layers) and A.14 (no normalisation)


def _layers(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for key in df["model"].unique():
        if "@" in key:
            df.loc[df["model"] == key, "layer"] = key.split("@", 1)[1]
    df.loc[df["model"] == "resnet50-unnormalized", "normalized"] = False
    sel = (df["model"] == "vgg16_bn@features.9") & (df["method"] == "opticam")
    _set(df, sel, "p", P)
    _set(df, sel, "o", [0.75, 0.8, 0.1, 0.95])
    return df


def test_layer_and_unnormalized_tables(tmp_path):
    models = ("vgg16_bn@features.9", "vgg16_bn@features.42", "vgg16_bn@features.32", "resnet50-unnormalized")
    spec = make_run(tmp_path / "out", "lay", datasets={"imagenet-val": 4}, models=models,
                    methods=("gradcam", "opticam"), failed=[], constant=[], edit=_layers)
    rows, cells, counts, tables = _tables(spec)
    a13 = _only(tables, "tableA13", part="opticam")
    assert a13.model == "vgg16_bn" and a13.slug.endswith("_opticam")
    assert a13.rows == ["vgg16_bn@features.42", "vgg16_bn@features.32", "vgg16_bn@features.9"]  # deepest first
    assert [a13.label(r) for r in a13.rows] == ["features.42", "features.32", "features.9"]
    # by hand (the hand run's Opti-CAM numbers): AD 18.75, AG 25, AI 50; the paper's layer 9: 4.3/44.2/71.9
    c = _cell(a13, "vgg16_bn@features.9", "AD")
    assert c.value == pytest.approx(18.75) and c.paper == pytest.approx(4.3)
    assert _cell(a13, "vgg16_bn@features.42", "AG").paper == pytest.approx(66.0)
    assert NOTE_LAYER42 in a13.notes
    # Grad-CAM over layers: a table, without the paper's values (A.13 is Opti-CAM's)
    assert not _only(tables, "tableA13", part="gradcam").has_paper

    a14 = _only(tables, "tableA14")
    assert a14.model == "resnet50-unnormalized" and base_model(a14.model) == "resnet50"
    assert _cell(a14, "gradcam", "AD").paper == pytest.approx(36.4)
    assert "input not normalised" in a14.caption
    # Figure 2 has no anchor for it (Table 1 is the normalised network) and its runtime is A.14's T / 8
    f2 = [t for t in build_tables(cells, counts, splits={"imagenet-val": "val"})
          if t.spec.key == "fig2" and t.model == "resnet50-unnormalized"]
    assert len(f2) == 1 and not f2[0].has_paper
    rt = runtime_table(rows, splits={"imagenet-val": "val"}).set_index(["model", "method"])
    assert rt.loc[("resnet50-unnormalized", "opticam"), "paper_s"] == pytest.approx(3.94 / 8)
    assert pd.isna(rt.loc[("vgg16_bn@features.42", "opticam"), "paper_s"])


def test_a_model_keyed_by_its_name_but_unnormalized_gets_no_table1_values(tmp_path):
    def edit(df):
        df = df.copy()
        df["normalized"] = False
        return df

    spec = make_run(tmp_path / "out", "raw", datasets={"imagenet-val": 4}, models=("vgg16_bn",),
                    methods=("gradcam",), failed=[], constant=[], edit=edit)
    rows, cells, counts, tables = _tables(spec)
    assert _cell(_only(tables, "tableA14"), "gradcam", "AI").paper == pytest.approx(25.2)
    rt = runtime_table(rows, splits={"imagenet-val": "val"})
    assert rt["paper_s"].iloc[0] == pytest.approx(0.02 / 8)  # A.14's T, which here equals Table 1's


# --------------------------------------------------------------------------------------------
# Table 4: AOPC (registered), MS and ADCC (through an aggregate that returns them)


def _aopc(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    _set(df, df["method"] == "gradcam", "aopc", [0.1, 0.2, 0.3, 0.2])
    _set(df, df["method"] == "opticam", "aopc", [0.05, 0.05, 0.1, 0.0])
    return df


def _with_ms_adcc(values, **kw):
    out = aggregate(values, **kw)
    n = len(values["p"])
    Agg = type(out["AD"])
    p = np.asarray(values["p"], dtype=float)
    shape = (len(kw["weights"]),) if kw.get("weights") is not None else ()
    out["MS"] = Agg(np.full(shape, 1.0 + p.mean()) if shape else 1.0 + p.mean(), n, 0)
    out["ADCC"] = Agg(np.full(shape, 100 * p.mean()) if shape else 100 * p.mean(), n, 0)
    return out


def test_table4_shows_the_metrics_the_rows_have_with_the_papers_directions(tmp_path):
    spec = make_run(tmp_path / "out", "t4", datasets={"imagenet-val": 4}, models=("resnet50",),
                    methods=("fakecam", "gradcam", "opticam"), failed=[], constant=[], edit=_aopc)
    _, _, _, tables = _tables(spec)
    t4 = _only(tables, "table4")
    assert [c.metric for c in t4.spec.columns] == ["AOPC"]
    assert t4.rows == ["gradcam", "opticam"]  # Fake-CAM has no AOPC in these rows
    aopc = _cell(t4, "gradcam", "AOPC")
    assert aopc.value == pytest.approx(20.0) and aopc.paper == pytest.approx(11.7) and aopc.best
    assert NOTE_AOPC_R50 in t4.notes and NOTE_ADCC not in t4.notes

    # MS and ADCC when `aggregate` returns them: MS with two decimals, ADCC ranked higher-is-better
    def edit(df):
        df = _aopc(df)
        _set(df, df["method"] == "gradcam", "p", [0.9] * 4)
        _set(df, df["method"] == "opticam", "p", [0.5] * 4)
        return df

    spec = make_run(tmp_path / "out2", "t4b", datasets={"imagenet-val": 4}, models=("vgg16_bn",),
                    methods=("gradcam", "opticam"), failed=[], constant=[], edit=edit)
    _, _, _, tables = _tables(spec, aggregate_fn=_with_ms_adcc)
    t4 = _only(tables, "table4")
    assert [c.label for c in t4.spec.columns] == ["AOPC↑", "MS↓", "ADCC↑"]
    ms, adcc = (next(c for c in t4.spec.columns if c.metric == k) for k in ("MS", "ADCC"))
    assert ms.digits == 2 and ms.lower_better and not adcc.lower_better
    assert t4.cell("gradcam", adcc).best and not t4.cell("opticam", adcc).best   # 90 beats 50
    assert t4.cell("opticam", ms).best                                          # 1.5 beats 1.9
    assert t4.cell("opticam", adcc).paper == pytest.approx(70.0) and t4.cell("gradcam", ms).paper == pytest.approx(1.10)
    assert NOTE_ADCC in t4.notes and NOTE_AOPC_R50 not in t4.notes
    assert "1.90" in table_markdown(t4)


# --------------------------------------------------------------------------------------------
# Selectivity (Fig. A4)

ALPHAS = [0.5, 1.0, 2.0]


def _selectivity(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for m, o in (("gradcam", [[0.5, 0.25, 0.1]] * 4), ("opticam", [[0.9, 0.95, 0.2], [0.9, 0.95, 0.2],
                                                                     [0.9, 0.95, 0.2], [0.9, 0.95, 0.2]])):
        sel = df["method"] == m
        _set(df, sel, "p", [0.5] * 4)
        idx = _index(df)
        for i in range(4):
            r = df.index[sel & (idx == i)][0]
            df.at[r, "selectivity_alpha"] = list(ALPHAS)
            df.at[r, "selectivity_o"] = list(o[i])
    return df


def test_selectivity_frame_by_hand(tmp_path):
    spec = make_run(tmp_path / "out", "sel", datasets={"imagenet-val": 4}, models=("vgg16_bn",),
                    methods=("gradcam", "opticam"), failed=[], constant=[], edit=_selectivity)
    sv = selectivity_frame(read_rows(spec.uri), resamples=20)
    assert sorted(sv["alpha"].unique()) == ALPHAS
    v = sv.set_index(["method", "alpha", "metric"])
    # Grad-CAM: p 0.5, o (0.5, 0.25, 0.1) → AD 0, 50, 80; Opti-CAM o 0.95 at α = 1 → AG 90, AI 100
    assert v.loc[("gradcam", 1.0, "AD"), "value"] == pytest.approx(50.0)
    assert v.loc[("gradcam", 2.0, "AD"), "value"] == pytest.approx(80.0)
    assert v.loc[("opticam", 1.0, "AG"), "value"] == pytest.approx(90.0)
    assert v.loc[("opticam", 2.0, "AI"), "value"] == pytest.approx(0.0)
    # every image is the same: the intervals collapse onto the value
    assert v.loc[("opticam", 0.5, "AG"), "lo"] == pytest.approx(80.0) and v["n"].eq(4).all()


# --------------------------------------------------------------------------------------------
# The whole report


def _everything(df: pd.DataFrame) -> pd.DataFrame:
    df = _selectivity(_variants(_aopc(df)))
    top = df[df["method"] == "gradcam"].copy()
    top["target"] = "top2"
    return pd.concat([df, top], ignore_index=True)


def test_report_renders_the_studies_with_paper_values_notes_and_figures(tmp_path):
    spec = make_run(tmp_path / "out", "all", datasets={"imagenet-val": 6}, models=("vgg16_bn",),
                    methods=("gradcam", *VARIANTS), failed=[("vgg16_bn", "gradcam", 2)], constant=[], edit=_everything)
    out = tmp_path / "report"
    report = build_report(spec.uri, out, resamples=10, grid_images=2, log=lambda m: None)
    keys = [t.spec.key for t in report.tables]
    assert keys[:3] == ["fig2", "fig3", "fig4"] and set(keys[3:]) == {"table4", "table6", "tableA9", "tableA12"}
    md, page = (out / "report.md").read_text(), (out / "index.html").read_text()
    for text in (md, page):
        assert "Table 6: Opti-CAM objective and normalisation" in text and "Table A.9" in text
        assert "Opti-CAM: IOMask / Range, 50 it." in text
        assert "66.3" in text and "Tables 6, A.12 and A.13" in text  # the layer-42 contradiction, said
    assert "(paper 7.1)" in md and "paper 99.7" in page
    studies = pd.read_csv(out / "studies.csv")
    assert set(studies["figure"]) == {"table4", "table6", "tableA9", "tableA12"}
    row = studies[(studies["figure"] == "table6") & (studies["method"] == "gradcam") & (studies["metric"] == "AD")]
    assert row["paper"].item() == pytest.approx(15.0) and row["failed_rows"].item() == 1
    assert row["ci_low"].notna().all()
    # the intervals of the other classes' maps are in aggregates.csv too
    agg = pd.read_csv(out / "aggregates.csv")
    assert (agg["subset"] == "target=top2").any()
    sv = pd.read_csv(out / "selectivity.csv")
    assert set(sv["method"]) == {"gradcam", "opticam"}  # the rows that have selectivity values
    with Image.open(out / "figures" / "selectivity_imagenet-val_vgg16_bn.png") as im:
        assert im.size == (12 * DPI, 4 * DPI)
    tex = (out / "tables.tex").read_text()
    assert tex.count("\\begin{table}") == len(report.tables)
    # the Rows table names the class the maps were made for
    assert "| vgg16_bn | gradcam | top2 |" in md
    # LaTeX of every study table: balanced, escaped, the header's width on every row
    _check_latex("\n".join(table_latex(t) for t in report.tables[3:]), len(report.tables) - 3)
    assert len(tables_frame(report.tables)) > 0


def test_comparison_aggregates_only_the_labels_maps(tmp_path):
    spec = make_run(tmp_path / "out", "cmp", datasets={"imagenet-val": 4}, models=("resnet50",),
                    methods=("gradcam", "opticam"), failed=[], constant=[], edit=_targets)
    rows = read_rows(spec.uri)
    old = rows.copy()
    old.loc[old["target"] == "top1", "o"] = 0.01  # the other classes' maps changed, the label's did not
    comp = compare_rows(rows, old, resamples=0, aggregate=aggregate)
    assert comp.counts["shared"] == len(rows) == 20  # every row is compared (the key holds the target) ...
    assert not comp.changes["flagged"].any()  # ... but the aggregates are the label's maps', as in the tables
    assert len(comp.moved) > 0  # the moved samples still show the top-1 maps' change


def test_old_rows_without_target_or_normalized_read_as_label_and_normalised(tmp_path):
    spec = make_run(tmp_path / "out", "old", datasets={"toy": 3}, methods=("gradcam",), failed=[], constant=[])
    f = next(spec.path.glob("**/*.parquet"))
    t = pq.read_table(f)
    pq.write_table(t.drop_columns([c for c in ("target", "normalized", "target_class") if c in t.column_names]), f)
    rows = read_rows(spec.uri)
    assert set(rows["target"]) == {"label"} and rows["normalized"].all()
    assert len(aggregate_rows(rows, resamples=0, aggregate=aggregate)) > 0


@pytest.mark.skipif(not any(n.startswith("sanity_") for n in RESULTS.names),
                    reason="the sanity-check columns are not in the results schema yet")
def test_sanity_figure_is_drawn_for_rows_with_sanity_values(tmp_path):
    cols = [n for n in RESULTS.names if n.startswith("sanity_")]

    def edit(df):
        df = df.copy()
        sel = df["method"] == "opticam"
        for col in cols:
            df[col] = None
            df.loc[sel, col] = pd.Series([[1.0, 0.5, 0.2]] * int(sel.sum()), index=df.index[sel])
        return df

    spec = make_run(tmp_path / "out", "san", datasets={"toy": 3}, methods=("gradcam", "opticam"), edit=edit)
    report = build_report(spec.uri, tmp_path / "r", resamples=5, grid_images=1, log=lambda m: None)
    rel = [rel for _, rel in report.figures if "sanity" in rel]
    assert rel == ["figures/sanity_toy_resnet50.png"]
    with Image.open(tmp_path / "r" / rel[0]) as im:
        assert im.size[0] > 0
    # without sanity values: no figure
    plain = make_run(tmp_path / "out2", "plain", datasets={"toy": 3}, methods=("gradcam",))
    assert not [r for _, r in build_report(plain.uri, tmp_path / "r2", resamples=0, figures=True,
                                           log=lambda m: None).figures if "sanity" in r]


# --------------------------------------------------------------------------------------------
# paper.csv: the studies' numbers, contradictions kept as printed


def test_paper_csv_holds_the_studies_as_printed():
    v = paper_values()
    count = lambda fig: sum(1 for k in v if k[0] == fig)  # noqa: E731
    # Table 4: 8 methods × 2 models × (AOPC, MS, ADCC); 6: 8 baselines + 6 variants; A.12: 8 + 4;
    # A.9: 4 methods × 5 columns × 3; A.13: 11 layers × 3; A.14: 9 methods × 2 models × (AD, AG, AI, T)
    assert [count(f) for f in ("table4", "table6", "tableA12", "tableA9", "tableA13", "tableA14")] == \
        [48, 42, 36, 60, 33, 72]
    assert v[("table4", "resnet50", "gradcam", "AOPC")] == 11.7 and v[("table4", "resnet50", "xgradcam", "AOPC")] == 11.9
    assert v[("table4", "vgg16_bn", "extremal", "ADCC")] == 42.8
    assert v[("table6", "vgg16_bn", "opticam/mask/range", "AG")] == 66.3
    assert v[("tableA13", "vgg16_bn@features.42", "opticam", "AG")] == 66.0
    assert v[("tableA13", "vgg16_bn@features.6", "opticam", "AI")] == 50.2
    assert v[("tableA12", "vgg16_bn", "opticam/iodiff/range", "AD")] == 25.9
    assert v[("table6", "vgg16_bn", "scorecam", "AI")] == 42.6 and v[("fig4", "vgg16_bn", "scorecam", "AI")] == 42.5
    assert v[("tableA9", "resnet50", "gradcam", "AD:top2")] == 96.26
    assert v[("tableA14", "resnet50", "extremal", "seconds")] == pytest.approx(15.67 / 8)
    assert v[("tableA14", "vgg16_bn", "layercam", "AD")] == 82.1
    assert all(math.isfinite(x) for x in v.values())
