"""Run-to-run comparison: a planted change is flagged and fails the threshold, noise is not,
the samples that moved are found, new failures count, `--against previous` picks the right run."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

from opticam_core.metrics import aggregate
from pipeline.cli import main as opticam
from pipeline.report import (
    compare_rows,
    open_run,
    parse_thresholds,
    read_rows,
    violations,
)
from tests._runs import make_run

N = 40
METHODS = ("fakecam", "gradcam", "opticam")


def _day(d):
    return datetime(2026, 1, d, tzinfo=timezone.utc)


def _scale_o(method, factor):
    def edit(df):
        df = df.copy()
        sel = (df["method"] == method) & df["error"].isna()
        df.loc[sel, "o"] = np.clip(df.loc[sel, "o"] * factor, 1e-4, 0.9999)
        return df
    return edit


def _noise(df, sd=0.002, seed=7):
    df = df.copy()
    ok = df["error"].isna()
    rng = np.random.default_rng(seed)
    df.loc[ok, "o"] = np.clip(df.loc[ok, "o"] * (1 + rng.normal(0, sd, int(ok.sum()))), 1e-4, 0.9999)
    return df


@pytest.fixture
def runs(tmp_path):
    out = tmp_path / "out"
    kw = dict(datasets={"imagenet-val": N}, models=("resnet50",), methods=METHODS, seed=0, failed=[], constant=[],
              maps=False, steps=4, iterations=5)
    base = make_run(out, "base", started=_day(1), **kw)
    worse = make_run(out, "worse", started=_day(2), edit=_scale_o("opticam", 0.7), **kw)
    return base, worse, kw


def test_planted_change_is_flagged_and_identical_methods_are_not(runs):
    base, worse, _ = runs
    c = compare_rows(read_rows(worse.uri), read_rows(base.uri), resamples=100, aggregate=aggregate)
    ch = c.changes.set_index(["method", "metric"])
    assert c.counts["shared"] == N * len(METHODS) and c.counts["newly_failed"] == 0
    ad = ch.loc[("opticam", "AD")]
    assert ad["delta"] > 2 and ad["flagged"] and ad["lo"] > 0
    assert ch.loc[("opticam", "AI"), "flagged"] and ch.loc[("opticam", "AI"), "delta"] < 0
    # nothing else changed: exact zeros, never flagged
    others = c.changes[c.changes["method"] != "opticam"]
    assert (others["delta"].fillna(0) == 0).all() and not others["flagged"].any()
    assert not ch.loc[("opticam", "I"), "flagged"] and ch.loc[("opticam", "I"), "delta"] == 0
    v = violations(c, parse_thresholds("AD=2"))
    assert v[["method", "metric"]].values.tolist() == [["opticam", "AD"]]
    assert violations(c, parse_thresholds("AD=50")).empty


def test_noise_is_not_a_finding(runs, tmp_path):
    base, _, kw = runs
    noisy = make_run(tmp_path / "out", "noisy", started=_day(3), edit=_noise, **kw)
    c = compare_rows(read_rows(noisy.uri), read_rows(base.uri), resamples=100, aggregate=aggregate)
    moved = c.changes[c.changes["delta"].abs() > 0]
    assert len(moved) > 0                                   # the noise did move something
    continuous = c.changes[c.changes["metric"].isin(["AD", "AG"])]
    assert continuous["delta"].abs().max() < 0.5            # …but little
    assert moved["flagged"].mean() <= 0.25                  # and mostly within its interval
    assert violations(c, parse_thresholds(None, threshold=2.0)).empty
    assert opticam(["report", noisy.uri, "--against", base.uri, "--threshold", "2", "--no-figures",
                    "--bootstrap", "30", "--out", str(tmp_path / "rep")]) == 0


def test_cli_exit_code_and_previous(runs, tmp_path):
    base, worse, _ = runs
    rep = tmp_path / "rep"
    rc = opticam(["report", worse.uri, "--against", "previous", "--fail-on", "AD=2,AG=50", "--no-figures",
                  "--bootstrap", "30", "--out", str(rep)])
    assert rc == 1
    assert "base" in (rep / "comparison.md").read_text()
    changes = pd.read_csv(rep / "comparison.csv")
    assert changes.loc[(changes["method"] == "opticam") & (changes["metric"] == "AD"), "flagged"].item()
    # the same change with a larger threshold, or only "worse" changes of a metric that improved
    assert opticam(["report", worse.uri, "--against", base.uri, "--fail-on", "AD=40", "--no-figures",
                    "--bootstrap", "30", "--out", str(rep)]) == 0
    # the new run has *lower* AI: that is worse for AI (↑) but, compared the other way round, better
    assert opticam(["report", base.uri, "--against", worse.uri, "--fail-on", "AI=2", "--fail-direction", "worse",
                    "--no-figures", "--bootstrap", "30", "--out", str(rep)]) == 0
    assert opticam(["report", base.uri, "--against", worse.uri, "--fail-on", "AI=2", "--fail-direction", "any",
                    "--no-figures", "--bootstrap", "30", "--out", str(rep)]) == 1


def test_moved_samples_and_new_failures(runs, tmp_path):
    base, _, kw = runs
    target = "imagenet-val-0005"

    def edit(df):
        df = df.copy()
        sel = (df["method"] == "gradcam") & (df["sample_id"] == target)
        df.loc[sel, "insertion"] = df.loc[sel, "insertion"] - 0.5
        return df

    kw = {**kw, "failed": [("resnet50", "opticam", 9)]}
    changed = make_run(tmp_path / "out", "changed", started=_day(4), edit=edit, **kw)
    c = compare_rows(read_rows(changed.uri), read_rows(base.uri), resamples=0, aggregate=aggregate, top=5)
    first = c.moved.iloc[0]
    assert (first["method"], first["sample_id"], first["field"]) == ("gradcam", target, "insertion")
    assert first["delta"] == pytest.approx(-0.5)
    assert c.counts["newly_failed"] == 1 and c.counts["shared"] == N * len(METHODS) - 1
    assert c.newly_failed[["method", "sample_id"]].values.tolist() == [["opticam", "imagenet-val-0009"]]
    # without resamples a change is flagged when it is not exactly zero
    ch = c.changes.set_index(["method", "metric"])
    assert ch.loc[("gradcam", "I"), "flagged"] and not ch.loc[("gradcam", "AD"), "flagged"]
    v = violations(c, parse_thresholds("failed=0"))
    assert v["metric"].tolist() == ["failed"]
    assert open_run(changed.uri).run_id == "changed"


def test_threshold_parsing():
    assert parse_thresholds(["AD=2,AG=1.5", "AD@box*=3"]) == {"AD": 2.0, "AG": 1.5, "AD@box*": 3.0}
    assert parse_thresholds(None, threshold=1) == {"*": 1.0}
    from pipeline.report.compare import _threshold_for

    t = parse_thresholds("AD=1,AD*=3,AD@box*=4", threshold=2)
    assert [_threshold_for(m, t) for m in ("AD", "AD@map_minus_box", "AD@box_and_map", "AG")] == [1, 3, 4, 2]
    for bad in ("AD", "AD=x", "=2", "AD=-1"):
        with pytest.raises(ValueError):
            parse_thresholds(bad)


def test_pairing_detects_a_small_consistent_shift(runs, tmp_path):
    """A 0.5% drop of o on every Opti-CAM image moves AG by far less than AG's spread over images;
    only a paired interval (same images drawn from both runs) sees it."""
    base, _, kw = runs
    shifted = make_run(tmp_path / "out", "shifted", started=_day(5), edit=_scale_o("opticam", 0.995), **kw)
    new, old = read_rows(shifted.uri), read_rows(base.uri)
    c = compare_rows(new, old, resamples=200, aggregate=aggregate)
    ag = c.changes.set_index(["method", "metric"]).loc[("opticam", "AG")]
    assert ag["delta"] < 0 and ag["flagged"] and ag["hi"] < 0
    # the unpaired intervals of the two runs' AG overlap widely
    from pipeline.report import aggregate_rows

    cells = {name: aggregate_rows(rows[rows["method"] == "opticam"], resamples=200, aggregate=aggregate)
             for name, rows in (("new", new), ("old", old))}
    a, b = (cells[k].set_index(["subset", "metric"]).loc[("all", "AG")] for k in ("new", "old"))
    assert a["hi"] > b["lo"] and b["hi"] > a["lo"]
    assert (a["hi"] - a["lo"]) > 3 * abs(ag["delta"])
