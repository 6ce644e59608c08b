"""ADCC as its authors' code computes it (aimagelab/ADCC): checked against a per-image reference
written here from their functions (average_drop, coherency with scipy's pearsonr, complexity,
the harmonic mean), on a toy network and on real EfficientNet-Lite0 weights and photos."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opticam_core import explain, load_model
from opticam_core.methods import REGISTRY
from opticam_core.methods.registry import register
from opticam_core.metrics import GROUPS, aggregate, compute, group_options
from opticam_core.metrics.adcc import adcc, coherency, harmonic_adcc
from opticam_core.metrics.rerun import Rerun
from opticam_core.options import OptionsError

from . import _toys
from ._peers import require


def _reference(bundle, x, t, method, target="pred"):
    """One image at a time, as their ADCC(): S(x) for the class, AD with p = top-1 probability
    (or the label's, for target="label"), the map re-made for the class on x ⊙ S, scipy's PCC
    (a NaN or, in our maps, constant map → 0), Σ|S|/(H·W), 3/(1/coh + 1/(1−com) + 1/(1−AD))."""
    stats = require("scipy.stats")
    rows = []
    for j in range(len(x)):
        image = x[j:j + 1]
        with torch.no_grad():
            out = torch.softmax(bundle.model(image).double(), 1)
        cls = int(out.argmax(1)) if target == "pred" else int(t[j])
        saliency = explain(bundle, image, [cls], method).maps.float().double()  # maps are stored float32
        explanation = image * saliency[:, None].to(image.dtype)
        with torch.no_grad():
            out_exp = torch.softmax(bundle.model(explanation).double(), 1)
        conf = float(out.max()) if target == "pred" else float(out[0, cls])
        avgdrop = max(0.0, conf - float(out_exp[0, cls])) / conf
        B = explain(bundle, explanation, [cls], method).maps.float()
        a, b = saliency.flatten().double().numpy(), B.flatten().double().numpy()
        if np.isnan(a).any() or np.isnan(b).any() or a.min() == a.max() or b.min() == b.max():
            coh = 0.0
        else:
            coh = (stats.pearsonr(a, b)[0] + 1) / 2
        com = float(saliency.abs().sum()) / (saliency.shape[-1] * saliency.shape[-2])
        try:
            value = 3 / (1 / coh + 1 / (1 - com) + 1 / (1 - avgdrop))
        except ZeroDivisionError:
            value = 0.0  # their code raises here; the harmonic mean's limit
        rows.append((value, coh, com, avgdrop))
    return torch.tensor(rows, dtype=torch.float64).T


def _ours(bundle, x, t, method, **options):
    maps = explain(bundle, x, t, method).maps
    out = compute(bundle, x, t, maps, which={"adcc": options}, method=method)
    return torch.stack([out[k] for k in ("adcc", "adcc_coherency", "adcc_complexity", "adcc_drop")])


@pytest.fixture(scope="module")
def toy():
    bundle = _toys.cnn_bundle()  # float64: the two sides agree to ~1e-12
    x, t = _toys.images(6, seed=4), _toys.targets(6, seed=1)
    with torch.no_grad():
        pred = bundle.model(x).argmax(1)
    assert (pred != t).any() and (pred == t).any()  # both branches of target="pred"
    return bundle, x, t


@pytest.mark.parametrize("method", ["gradcam", "scorecam"])
@pytest.mark.parametrize("target", ["pred", "label"])
def test_matches_the_authors_formulas_on_a_toy(toy, method, target):
    bundle, x, t = toy
    ours, ref = _ours(bundle, x, t, method, target=target), _reference(bundle, x, t, method, target)
    assert (ours[0] < 1).all() and (ours[0] > 0).sum() >= 4  # (a zero Grad-CAM map for a class: ADCC 0)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)


def test_matches_the_authors_formulas_on_real_weights_and_photos():
    require("skimage.data")
    bundle = load_model("efficientnet_lite0")
    x = torch.cat([_toys.skimage_photo(n) for n in ("chelsea", "coffee", "rocket")])
    t = torch.tensor([281, 967, 409])  # the rocket's row is made for "analog clock": pred ≠ row's class
    ours, ref = _ours(bundle, x, t, "gradcam"), _reference(bundle, x, t, "gradcam")
    assert (ours[0] > 0.3).all()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_the_rows_map_is_reused_where_the_prediction_is_its_class(toy):
    bundle, x, t = toy
    with torch.no_grad():
        pred = bundle.model(x).argmax(1)
    maps = explain(bundle, x, pred, "gradcam").maps
    rerun = Rerun(bundle, "gradcam")
    adcc(bundle, rerun, x, maps, pred)
    assert rerun.calls == len(x)  # the coherency re-run only
    rerun = Rerun(bundle, "gradcam")
    adcc(bundle, rerun, x, explain(bundle, x, t, "gradcam").maps, t)
    assert rerun.calls == len(x) + int((pred != t).sum())


def test_edge_cases_of_the_components():
    a = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(0))
    flat = torch.zeros(8, 8)
    pair = coherency(torch.stack([a[0], a[1], flat, a[2]]), torch.stack([a[0], flat, a[3], a[2] * float("nan")]))
    assert pair[0] == pytest.approx(1.0) and pair[1] == 0 and pair[2] == 0 and math.isnan(pair[3])
    # a component at 0 gives ADCC 0; a NaN gives NaN; otherwise the harmonic mean
    coh, com, drop = (torch.tensor(v, dtype=torch.float64) for v in ([0.0, 0.5, 0.5, 0.5, math.nan, 0.8],
                                                                      [0.5, 1.0, 0.5, 0.5, 0.5, 0.4],
                                                                      [0.5, 0.5, 1.0, 0.0, 0.5, 0.1]))
    got = harmonic_adcc(coh, com, drop)
    assert got[:3].tolist() == [0.0, 0.0, 0.0] and math.isnan(got[4])
    assert got[3] == pytest.approx(3 / (2 + 2 + 1)) and got[5] == pytest.approx(3 / (1 / 0.8 + 1 / 0.6 + 1 / 0.9))


def _zeros(ctx):
    return torch.zeros(ctx.images.shape[0], *ctx.images.shape[-2:], dtype=ctx.images.dtype, device=ctx.device), \
        {"constant": torch.ones(len(ctx.images), dtype=torch.bool, device=ctx.device)}


def test_a_constant_map_scores_zero(toy):
    bundle, x, t = toy
    register("_zeros", name="Zeros", family="reference", rank=995)(_zeros)
    try:
        out = compute(bundle, x, t, torch.zeros(len(x), 32, 32), which={"adcc": {}}, method="_zeros")
    finally:
        del REGISTRY["_zeros"]
    assert out["adcc"].tolist() == [0.0] * len(x) and out["adcc_coherency"].tolist() == [0.0] * len(x)
    assert out["adcc_complexity"].tolist() == [0.0] * len(x)


def test_a_failed_rerun_costs_that_image_only(toy):
    bundle, x, t = toy
    maps = explain(bundle, x, t, "gradcam").maps

    def flaky(images, targets):
        out = explain(bundle, images, targets, "gradcam").maps
        out[1] = float("nan")
        return out

    got = adcc(bundle, flaky, x, maps, t, target="label")
    assert torch.isnan(got["adcc"][1]) and torch.isfinite(got["adcc"][[0, 2, 3, 4, 5]]).all()
    assert torch.isfinite(got["adcc_drop"]).all()


def test_options_cost_and_aggregate():
    with pytest.raises(OptionsError, match=r"metrics\.adcc\.target"):
        group_options({"adcc": {"target": "top1"}})
    assert GROUPS["adcc"].calls_method
    label, pred = GROUPS["adcc"].cost_of({"target": "label"}), GROUPS["adcc"].cost_of()
    assert (label.forwards, label.reruns, pred.forwards, pred.reruns) == (1, 1, 1, 2)
    values = {"adcc": [0.5, 0.7, math.nan], "adcc_coherency": [0.9, 0.8, 0.7], "adcc_complexity": [0.2, 0.4, 0.3],
              "error": [None, None, "boom"]}
    got = aggregate(values)
    assert got["ADCC"].value == pytest.approx(60.0) and got["ADCC"].n == 2
    assert got["Coherency"].value == pytest.approx(85.0) and got["Complexity"].value == pytest.approx(30.0)
    w = np.array([[1, 0, 0], [0, 1, 1]], dtype=float)
    assert aggregate(values, weights=w)["ADCC"].value == pytest.approx([50.0, 70.0])
