"""AOPC (Quantus RegionPerturbation) and selectivity (AD/AG/AI of S^α).

AOPC: parity with Quantus's own `RegionPerturbation` on the same model, images and maps (a toy CNN
for every option; EfficientNet-Lite0 on real photos with Grad-CAM maps for the paper's setting),
exact values on a linear model, bad options. Selectivity: α = 1 is the classification group, a
hand-computed value at α = 2, α ≤ 0 refused, the aggregation's rules.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from opticam_core import explain, load_model, wrap_model
from opticam_core import metrics as M
from opticam_core.options import OptionsError
from tests import _toys as T
from tests._peers import require

# ---------------------------------------------------------------------------------------------
# Quantus, run as the paper ran it


def quantus_curves(bundle, images, maps, targets, *, patch_size, regions, order="morf", baseline="black",
                   softmax=True) -> np.ndarray:
    quantus = require("quantus")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = quantus.RegionPerturbation(patch_size=patch_size, regions_evaluation=regions, order=order,
                                            perturb_baseline=baseline, disable_warnings=True)
        out = metric(model=bundle.model, x_batch=images.numpy(), y_batch=targets.numpy(),
                     a_batch=maps[:, None].numpy(), device="cpu", softmax=softmax)
    return np.asarray(out, dtype=np.float64)


@pytest.fixture(scope="module")
def toy():
    bundle = T.cnn_bundle(dtype=torch.float32)
    images, targets = T.images(4, dtype=torch.float32), T.targets(4)
    maps = torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(1))  # no ties between patch sums
    return bundle, images, maps, targets


@pytest.mark.parametrize("baseline", ["black", "white", "mean", 0.3])
@pytest.mark.parametrize("order", ["morf", "lerf"])
@pytest.mark.parametrize("softmax", [True, False])
def test_matches_quantus_on_a_toy(toy, baseline, order, softmax):
    bundle, images, maps, targets = toy
    value, curve = M.region_perturbation(bundle, images, maps, targets, patch_size=8, regions=10, order=order,
                                         baseline=baseline, softmax=softmax, batch_size=7)
    theirs = quantus_curves(bundle, images, maps, targets, patch_size=8, regions=10, order=order,
                            baseline=baseline, softmax=softmax)
    assert curve.shape == theirs.shape == (4, 10)
    assert np.abs(theirs).max() > 1e-3  # the curve moves: parity is not 0 = 0
    scale = 1.0 if softmax else float(np.abs(theirs).max())
    np.testing.assert_allclose(curve.numpy(), theirs, rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(value.numpy(), theirs.sum(1) / 11, rtol=0, atol=2e-6 * scale)


def test_regions_capped_at_the_patch_count(toy):
    """4×4 patches of 8 px: regions = 20 removes all 16, like Quantus's slice of its patch list."""
    bundle, images, maps, targets = toy
    value, curve = M.region_perturbation(bundle, images, maps, targets, patch_size=8, regions=20)
    theirs = quantus_curves(bundle, images, maps, targets, patch_size=8, regions=20)
    assert curve.shape == theirs.shape == (4, 16)
    np.testing.assert_allclose(curve.numpy(), theirs, rtol=0, atol=2e-6)
    np.testing.assert_allclose(value.numpy(), curve.sum(1).numpy() / 17, rtol=1e-12)


@pytest.fixture(scope="module")
def real():
    skimage_data = require("skimage.data")
    photos = {"chelsea": 281, "coffee": 967, "rocket": 657}
    bundle = load_model("efficientnet_lite0")
    images = torch.stack([M.preprocess(torch.from_numpy(getattr(skimage_data, n)().copy()).permute(2, 0, 1))
                          for n in photos])
    targets = torch.tensor(list(photos.values()))
    maps = explain(bundle, images, targets, "gradcam").maps.detach()
    return bundle, images, maps, targets


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_matches_quantus_on_real_weights(real, order):
    """The paper's setting (14-px patches, 10 regions, Quantus's defaults) on EfficientNet-Lite0."""
    bundle, images, maps, targets = real
    with torch.no_grad():
        logits = bundle.model(images)
    value, curve = M.region_perturbation(bundle, images, maps, targets, clean_logits=logits, order=order)
    theirs = quantus_curves(bundle, images, maps, targets, patch_size=14, regions=10, order=order)
    assert curve.shape == (3, 10)
    # the curve moves: removing the most relevant patches costs much more than the least relevant
    assert np.abs(theirs).max() > (0.2 if order == "morf" else 0.01), theirs
    np.testing.assert_allclose(curve.numpy(), theirs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(value.numpy(), theirs.sum(1) / 11, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Closed form: logits (0, z) with z = Σ x (identity normalisation), 4×4 images, 2×2 patches


class SumLogit(nn.Module):
    """logits (0, z), z = scale · Σ x."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.body = nn.Identity()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float64))

    def forward(self, x):
        z = self.scale * self.body(x).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(z), z], dim=1)


def sum_bundle(scale: float = 1.0):
    return wrap_model(SumLogit(scale), "body", name="sum_logit", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                      prefix_tokens=None, tail=None, input_size=(4, 4), resize=4)


def patchwise(values) -> torch.Tensor:
    """4×4 from 2×2 patch values in raster order (top-left, top-right, bottom-left, bottom-right)."""
    return torch.tensor(values, dtype=torch.float64).view(2, 2).repeat_interleave(2, 0).repeat_interleave(2, 1)


@pytest.mark.parametrize("order, baseline, expected", [
    # x per patch (0.2, 0.8, 0.6, 0.4), S per patch (0.1, 0.9, 0.5, 0.3); 12 elements per patch.
    # MoRF = TR, BL, BR; black = min x = 0.2: drops 12·0.6, +12·0.4, +12·0.2
    ("morf", "black", [7.2, 12.0, 14.4]),
    # white = max x = 0.8: TR unchanged, BL +12·0.2, BR +12·0.4 (a negative drop: z rises)
    ("morf", "white", [0.0, -2.4, -7.2]),
    # mean of the current image: 0.5, then (24 − 9.6 + 6)/48 = 0.425, then (20.4 − 7.2 + 5.1)/48 = 0.38125
    ("morf", "mean", [3.6, 3.6 + 12 * 0.175, 3.6 + 12 * 0.175 + 12 * 0.01875]),
    # LeRF = TL, BR, BL with a fixed 0: 12·0.2, +12·0.4, +12·0.6
    ("lerf", 0.0, [2.4, 7.2, 14.4]),
])
def test_closed_form(order, baseline, expected):
    x = patchwise([0.2, 0.8, 0.6, 0.4]).expand(3, 4, 4)[None].clone()
    s = patchwise([0.1, 0.9, 0.5, 0.3])[None].float()
    value, curve = M.region_perturbation(sum_bundle(), x, s, [1], patch_size=2, regions=3, order=order,
                                         baseline=baseline, softmax=False)
    torch.testing.assert_close(curve[0], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert value.item() == pytest.approx(sum(expected) / 4, abs=1e-12)
    # with softmax: the probability of class 1 is σ(z), z = 24 on x
    _, probs = M.region_perturbation(sum_bundle(), x, s, [1], patch_size=2, regions=3, order=order,
                                     baseline=baseline)
    z = 24.0 - torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(probs[0], torch.sigmoid(torch.tensor(24.0, dtype=torch.float64)) - torch.sigmoid(z))


def test_batched_equals_one_by_one(toy):
    bundle, images, maps, targets = toy
    _, together = M.region_perturbation(bundle, images, maps, targets, patch_size=8, batch_size=64)
    alone = torch.cat([M.region_perturbation(bundle, images[i:i + 1], maps[i:i + 1], targets[i:i + 1],
                                             patch_size=8, batch_size=3)[1] for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The group, its options and its aggregate


def test_group_fields_and_aggregate(toy):
    bundle, images, maps, targets = toy
    out = M.compute(bundle, images, targets, maps, which={"aopc": {"patch_size": 8, "regions": 5}})
    value, curve = M.region_perturbation(bundle, images, maps, targets, patch_size=8, regions=5)
    assert out["aopc_curve"].shape == (4, 5) and out["aopc_curve"].dtype == torch.float32
    torch.testing.assert_close(out["aopc"], value)
    torch.testing.assert_close(out["aopc_curve"], curve.float())
    rows = {k: v.numpy() for k, v in out.items()}
    rows["error"] = [None, None, None, "boom"]  # an errored row counts nowhere
    agg = M.aggregate(rows)["AOPC"]
    assert (agg.n, agg.excluded) == (3, 1)
    assert agg.value == pytest.approx(100 * value[:3].mean().item(), rel=1e-12)
    weights = np.array([[1.0, 1, 1, 1], [2.0, 0, 0, 1]])  # second resample: image 0 twice
    boot = M.aggregate(rows, weights=weights)["AOPC"]
    np.testing.assert_allclose(boot.value, [agg.value, 100 * value[0].item()], rtol=1e-12)
    assert M.metric("AOPC").higher_is_better and M.metric("AOPC").percent


def test_bad_options(toy):
    bundle, images, maps, targets = toy
    with pytest.raises(OptionsError, match=r"metrics\.aopc\.patch_size: 14 does not divide the input size 32×32"):
        M.compute(bundle, images, targets, maps, which={"aopc": {}})
    with pytest.raises(OptionsError, match=r"metrics\.aopc\.patch_size: 15 does not divide .* 224×224"):
        M.check_aopc_input_size({"patch_size": 15}, (224, 224))
    M.check_aopc_input_size(None, (224, 224))  # the paper's 14 px fit
    M.check_aopc_input_size({"patch_size": 16}, (224, 224))
    for bad, field in (({"order": "lrf"}, "order"), ({"baseline": "grey"}, "baseline"),
                       ({"baseline": float("nan")}, "baseline"), ({"regions": 0}, "regions"),
                       ({"softmax": "yes"}, "softmax"), ({"patch_size": 0}, "patch_size")):
        with pytest.raises(OptionsError, match=rf"metrics\.aopc\.{field}:"):
            M.group_options({"aopc": bad})
    assert M.group_options({"aopc": {"baseline": 0}})["aopc"]["baseline"] == 0.0


# ---------------------------------------------------------------------------------------------
# Selectivity


def test_alpha_one_is_the_classification_group():
    bundle, images, targets = T.cnn_bundle(), T.images(5), T.targets(5)
    maps = torch.rand(5, 32, 32, generator=torch.Generator().manual_seed(2))
    # batch_size = B: the α = 1 forward is the very batch the classification group runs
    out = M.compute(bundle, images, targets, maps, which={"classification": {}, "selectivity": {"batch_size": 5}})
    alphas = out["selectivity_alpha"]
    assert alphas.shape == out["selectivity_o"].shape == (5, 10)
    assert alphas.dtype == out["selectivity_o"].dtype == torch.float32  # list<float32> fields
    assert alphas[0].tolist() == [np.float32(a) for a in (0.01, 0.05, 0.1, 0.5, 1, 1.5, 2, 3, 5, 10)]  # Fig. A4
    one = alphas[0].tolist().index(1.0)
    assert torch.equal(out["selectivity_o"][:, one], out["o"].float())
    # in float64 (the core function): bit for bit, and so are AD, AG, AI
    alpha, o = M.selectivity(bundle, images, maps, targets, batch_size=5)
    assert torch.equal(o[:, one], out["o"])
    rows = {k: v.numpy() for k, v in out.items()}
    rows.update(selectivity_alpha=alpha[None].expand(5, -1).numpy(), selectivity_o=o.numpy())
    ours, theirs = M.aggregate_selectivity(rows)[1.0], M.aggregate(rows)
    for key in ("AD", "AG", "AI"):
        assert ours[key] == theirs[key]
    # other α: another mask, another o (the vector is not α = 1 copied)
    assert not torch.equal(o[:, 0], out["o"])


def test_hand_computed_value_at_alpha_two():
    """x = 1, S = 0.5 on the top half and 1 below: z(x) = 48/8 = 6; S² = 0.25 / 1 gives
    z = (24·0.25 + 24)/8 = 3.75. Image 0 is explained for class 1 (σ(z): a drop), image 1 for
    class 0 (σ(−z): a gain)."""
    bundle = sum_bundle(1 / 8)  # z = Σ x / 8
    x = torch.ones(2, 3, 4, 4, dtype=torch.float64)
    s = torch.ones(2, 4, 4)
    s[:, :2] = 0.5
    targets = torch.tensor([1, 0])
    out = M.compute(bundle, x, targets, s, which={"selectivity": {"alphas": [2, 1]}})
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    # columns α = 2, 1: z = 3.75 and (24·0.5 + 24)/8 = 4.5
    expected = torch.tensor([[sig(3.75), sig(4.5)], [sig(-3.75), sig(-4.5)]], dtype=torch.float64)
    torch.testing.assert_close(out["selectivity_o"], expected.float(), rtol=1e-6, atol=0)
    _, o = M.selectivity(bundle, x, s, targets, alphas=[2, 1])
    torch.testing.assert_close(o, expected, rtol=1e-12, atol=0)
    agg = M.aggregate_selectivity({"p": out["p"].numpy(), "selectivity_alpha": [[2.0, 1.0]] * 2,
                                   "selectivity_o": o.numpy()})
    assert list(agg) == [1.0, 2.0]
    p1, o1 = sig(6.0), sig(3.75)   # image 0: drop (p − o)/p
    p0, o0 = sig(-6.0), sig(-3.75)  # image 1: gain (o − p)/(1 − p)
    assert agg[2.0]["AD"].value == pytest.approx(100 * (p1 - o1) / p1 / 2, rel=1e-12)
    assert agg[2.0]["AG"].value == pytest.approx(100 * (o0 - p0) / (1 - p0) / 2, rel=1e-12)
    assert agg[2.0]["AI"].value == pytest.approx(50.0)
    assert agg[2.0]["AD"].n == 2


def test_aggregate_selectivity_rows():
    """Keys as written (float32 storage of 0.01 comes back 0.01), errors left out, bootstrap
    weights like `aggregate`'s, no columns → {}."""
    rows = {"p": [0.5, 0.75, 0.4],  # exact in float32, as o is
            "selectivity_alpha": [np.float32([0.01, 1.0])] * 3,
            "selectivity_o": [np.float32([0.25, 0.75]), np.float32([0.375, 0.75]), None],
            "error": [None, None, None]}
    agg = M.aggregate_selectivity(rows)
    assert list(agg) == [0.01, 1.0]
    assert agg[0.01]["AD"].value == pytest.approx(100 * (0.5 + 0.5) / 2, rel=1e-6)
    assert (agg[0.01]["AD"].n, agg[0.01]["AD"].excluded) == (2, 1)  # the row without o
    rows["error"] = ["x", None, None]
    assert M.aggregate_selectivity(rows)[0.01]["AD"].value == pytest.approx(50.0, rel=1e-6)
    rows["error"] = [None, None, None]
    boot = M.aggregate_selectivity(rows, weights=[[1, 1, 1], [0, 2, 1]])
    # AG at α = 1: gains 0.5 and 0 (the third row has no o); the second resample draws only row 1
    np.testing.assert_allclose(boot[1.0]["AG"].value, [25.0, 0.0], rtol=1e-12)
    assert M.aggregate_selectivity({"p": [0.5]}) == {}


def test_alpha_must_be_positive(toy):
    bundle, images, maps, targets = toy
    for bad in ([0.5, 0.0], -1, []):
        with pytest.raises(OptionsError, match=r"metrics\.selectivity\.alphas"):
            M.group_options({"selectivity": {"alphas": bad}})
    with pytest.raises(OptionsError, match=r"metrics\.selectivity\.alphas"):
        M.selectivity(bundle, images, maps, targets, alphas=[1.0, -2.0])
