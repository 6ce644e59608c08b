"""Aggregation: hand-computed numbers for every metric, the exclusion rules, BA's order of
operations, pandas rows with nulls, and bootstrap weights."""

from __future__ import annotations

import math

import numpy as np
import pytest

from opticam_core import metrics as M

NAN = float("nan")


def rows():
    """Five images; the fourth has no box, the fifth failed."""
    return {
        "label": [1, 2, 3, 4, 5],
        "pred": [1, 2, 0, 4, 5],
        "p": [0.5, 0.8, 0.2, 1.0, 0.3],
        "o": [0.25, 0.8, 0.6, 1.0, 0.9],
        "insertion": [0.5, 0.7, 0.3, 0.9, 0.1],
        "deletion": [0.1, 0.2, 0.3, NAN, 0.9],
        "has_box": [True, True, True, False, True],
        "loc_iou": [0.6, 0.4, 0.9, NAN, 0.9],
        "pointing": [True, False, True, False, True],
        "pointing_tol": [True, True, True, False, True],
        "energy": [1.0, 0.5, 0.0, NAN, 1.0],
        "recall": [1.0, 0.5, 0.0, NAN, 1.0],
        "box_iou": [[0.35, 0.75], [0.35, 0.75], [0.35, 0.1], None, [0.9, 0.9]],
        "sm": [1.0, 2.0, NAN, 3.0, 4.0],
        "o_box_and_map": [0.5, 0.4, 0.1, NAN, 0.2],
        "o_map_minus_box": [0.0, 0.8, 0.2, NAN, 0.2],
        "o_box": [0.6, 0.9, 0.2, NAN, 0.2],
        "o_not_box": [0.1, 0.1, 0.1, NAN, 0.2],
        "error": [None, None, None, None, "boom"],
    }


def test_every_metric_by_hand():
    a = M.aggregate(rows())
    assert set(a) == set(M.METRICS)
    # AD: terms ½, 0, 0, 0 → 12.5 over 4 rows; AG: 0, 0, ½, undefined (p = 1) → 3 rows; AI: 1 of 4
    assert a["AD"] == (pytest.approx(12.5), 4, 1)
    assert a["AG"] == (pytest.approx(100 * 0.5 / 3), 3, 2)
    assert a["AI"] == (pytest.approx(25.0), 4, 1)
    assert M.aggregate(rows(), undefined="zero")["AG"] == (pytest.approx(12.5), 4, 1)
    assert a["I"] == (pytest.approx(60.0), 4, 1)
    assert a["D"] == (pytest.approx(20.0), 3, 2)  # NaN deletion left out
    # boxed rows: 1, 2, 3. LE (0.5 rule): misses at 0.4 → 1/3; OM: also image 3 (wrong class) → 2/3
    assert a["LE"] == (pytest.approx(100 / 3), 3, 2)
    assert a["OM"] == (pytest.approx(200 / 3), 3, 2)
    raw = M.aggregate(rows(), om_rule="iou")
    assert raw["LE"].value == pytest.approx(100 * (0.4 + 0.6 + 0.1) / 3)
    assert raw["OM"].value == pytest.approx(100 * (0.4 + 0.6 + 1.0) / 3)
    assert a["F1"] == (pytest.approx(100 * (1 + 0.5 + 0) / 3), 3, 2)
    assert a["SP"] == (pytest.approx(200 / 3), 3, 2)
    assert M.aggregate(rows(), pointing="pointing_tol")["SP"].value == pytest.approx(100.0)
    assert a["EP"] == (pytest.approx(50.0), 3, 2)
    assert a["SM"] == (pytest.approx(2.0), 3, 2)  # not in percent; NaN and failed rows left out
    # box study: AD for S·M: ½·… p=0.5→0.5: 0; 0.8→0.4: ½; 0.2→0.1: ½ → 100/3
    assert a["AD@box_and_map"] == (pytest.approx(100 / 3), 3, 2)
    assert a["AI@map_minus_box"] == (pytest.approx(0.0), 3, 2)
    assert a["AG@box"].value == pytest.approx(100 * (0.1 / 0.5 + 0.1 / 0.2 + 0) / 3)
    assert a["AD@not_box"].value == pytest.approx(100 * (0.4 / 0.5 + 0.7 / 0.8 + 0.1 / 0.2) / 3)


def test_box_accuracy_takes_the_best_threshold_per_delta_then_the_mean():
    # δ=0.3: η0 hits 3/3 → best 1; δ=0.5: η1 hits 2/3; δ=0.7: η1 hits 2/3 → BA = 7/9.
    # (One η for all δ would give 2/3; the mean of per-image bests, 1.)
    a = M.aggregate(rows())["BA"]
    assert a == (pytest.approx(700 / 9), 3, 2)
    assert M.aggregate(rows(), ba_deltas=(0.5,))["BA"].value == pytest.approx(200 / 3)


def test_f1_of_means():
    v = {"has_box": [True, True], "energy": [1.0, 0.0], "recall": [0.2, 0.0]}
    per_image = M.aggregate(v)["F1"].value
    of_means = M.aggregate(v, f1="of_means")["F1"].value
    assert per_image == pytest.approx(100 * (2 * 0.2 / 1.2) / 2)
    assert of_means == pytest.approx(100 * 2 * 0.5 * 0.1 / 0.6)


def test_missing_columns_and_options():
    a = M.aggregate({"p": [0.5], "o": [0.6]})
    assert a["AI"] == (100.0, 1, 0)
    assert math.isnan(a["BA"].value) and a["BA"].n == 0 and a["BA"].excluded == 1
    with pytest.raises(ValueError, match="om_rule"):
        M.aggregate({"p": [0.5]}, om_rule="strict")
    with pytest.raises(ValueError, match="lengths"):
        M.aggregate({"p": [0.5], "o": [0.5, 0.2]})


def test_pandas_rows_with_nulls_give_the_same_numbers():
    pd = pytest.importorskip("pandas")
    r = rows()
    frame = pd.DataFrame(r)
    frame["has_box"] = frame["has_box"].astype("boolean")
    frame["pointing"] = frame["pointing"].astype("boolean")
    frame.loc[3, "pointing"] = pd.NA  # a null boolean, as Parquet gives back
    a, b = M.aggregate(frame), M.aggregate(r)
    for k in M.METRICS:
        assert (math.isnan(a[k].value) and math.isnan(b[k].value)) or a[k] == b[k], k


def test_weights_give_the_aggregates_of_resamples():
    r = rows()
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 5, size=(6, 5))
    weights = np.stack([np.bincount(i, minlength=5) for i in idx]).astype(float)
    got = M.aggregate(r, weights=weights)
    for k in ("AD", "AG", "I", "OM", "F1", "BA", "SP", "SM", "AD@box"):
        assert got[k].value.shape == (6,)
        for j, take in enumerate(idx):
            sub = {c: [v[t] for t in take] for c, v in r.items()}
            want = M.aggregate(sub)[k].value
            assert (math.isnan(want) and math.isnan(got[k].value[j])) or got[k].value[j] == pytest.approx(want), (k, j)
