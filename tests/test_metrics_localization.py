"""Localization: components against scipy, hand-drawn maps with known boxes and IoUs, the pointing
game with and without tolerance, F1's precision and recall, the saliency metric on a toy model
whose probabilities are known in closed form, and Quantus where it installs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from opticam_core import metrics as M
from opticam_core.metrics.components import largest_component_boxes
from tests._peers import require
from tests.test_metrics_classification import closed_form_logit, linear_bundle

# ---------------------------------------------------------------------------------------------
# Components


def _scipy_largest(masks: torch.Tensor, connectivity: int):
    from scipy import ndimage

    structure = np.ones((3, 3)) if connectivity == 8 else None
    out = []
    for m in masks.numpy():
        lab, k = ndimage.label(m, structure=structure)  # labels in raster order of first pixel
        if k == 0:
            out.append([0, 0, 0, 0, 0])
            continue
        counts = np.bincount(lab.ravel())[1:]
        ys, xs = np.nonzero(lab == np.argmax(counts) + 1)  # argmax: first of equals
        out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, counts.max()])
    return torch.tensor(out, dtype=torch.float32)


def _spiral(n: int) -> np.ndarray:
    m = np.zeros((n, n), bool)
    lo, hi = 0, n - 1
    while lo + 2 <= hi:
        m[lo, lo:hi + 1] = m[lo:hi + 1, hi] = m[hi, lo:hi + 1] = True
        m[lo + 2:hi + 1, lo] = True
        m[lo + 2, lo:lo + 3] = True
        lo, hi = lo + 2, hi - 2
    return m


@pytest.mark.parametrize("connectivity", [4, 8])
def test_components_match_scipy(connectivity):
    gen = torch.Generator().manual_seed(connectivity)
    noise = torch.rand(60, 23, 31, generator=gen)
    masks = torch.cat([noise[:20] < 0.3, noise[20:40] < 0.55, noise[40:] < 0.75,
                       torch.zeros(1, 23, 31, dtype=torch.bool), torch.ones(1, 23, 31, dtype=torch.bool)])
    want = _scipy_largest(masks, connectivity)
    for budget in (2 ** 24, 1):  # one chunk, and one mask per chunk
        boxes, sizes = largest_component_boxes(masks, connectivity, budget=budget)
        assert torch.equal(torch.cat([boxes, sizes[:, None].float()], 1), want)
    spiral = torch.from_numpy(_spiral(40))[None]
    boxes, sizes = largest_component_boxes(spiral, connectivity)
    assert torch.equal(torch.cat([boxes, sizes[:, None].float()], 1), _scipy_largest(spiral, connectivity))
    assert sizes.item() == spiral.sum().item()  # one long path: every round of propagation counts


def test_diagonal_touch_and_ties():
    m = torch.zeros(1, 6, 6, dtype=torch.bool)
    m[0, 0:2, 0:2] = True  # 4 pixels
    m[0, 2:4, 2:4] = True  # 4 pixels, touching the first at a corner only
    b8, s8 = largest_component_boxes(m, 8)
    b4, s4 = largest_component_boxes(m, 4)
    assert b8[0].tolist() == [0, 0, 4, 4] and s8.item() == 8
    assert b4[0].tolist() == [0, 0, 2, 2] and s4.item() == 4  # tie: the one starting first in raster order
    m2 = torch.zeros(1, 6, 6, dtype=torch.bool)
    m2[0, 4:6, 0:2] = True
    m2[0, 0:2, 4:6] = True  # starts first in raster order (row 0)
    assert largest_component_boxes(m2, 8)[0][0].tolist() == [4, 0, 6, 2]


# ---------------------------------------------------------------------------------------------
# Hand-drawn maps


def _two_blobs():
    s = torch.zeros(1, 16, 16)
    s[0, 2:6, 2:8] = 1.0  # big: 24 px, box (2, 2, 8, 6)
    s[0, 10:12, 10:12] = 0.9  # small: 4 px
    return s


def test_mean_threshold_box_is_the_largest_component():
    s = _two_blobs()
    boxes = [torch.tensor([[2.0, 2.0, 8.0, 6.0]])]
    out = M.localization(s, boxes, tolerance=0)
    assert out["has_box"].tolist() == [True]
    assert out["loc_iou"].item() == pytest.approx(1.0)
    # a GT box covering the small blob only, and one half over the big blob: best IoU wins
    boxes = [torch.tensor([[10.0, 10.0, 12.0, 12.0], [5.0, 2.0, 11.0, 6.0]])]
    iou = M.localization(s, boxes)["loc_iou"].item()
    assert iou == pytest.approx(12 / 36)  # inter 3×4, union 24 + 24 − 12


def test_box_iou_per_threshold():
    s = torch.zeros(1, 10, 10)
    s[0, 1:9, 1:9] = 0.5  # ring level: box (1, 1, 9, 9)
    s[0, 3:5, 3:7] = 1.0  # core: box (3, 3, 7, 5)
    gt = torch.tensor([[3.0, 3.0, 7.0, 5.0]])
    iou = M.localization(s, [gt])["box_iou"][0]
    assert iou.shape == (100,)
    # strict thresholds ({S > η}, App. B.5): η = 0 keeps the ring, not the whole image
    assert torch.allclose(iou[:50], torch.full((50,), 8 / 64))  # 0 ≤ η < 0.5: the ring's box
    assert torch.allclose(iou[50:], torch.ones(50))  # η ≥ 0.5: the core


def _box_accuracy(maps, boxes):
    out = M.localization(maps, boxes)
    return M.aggregate({"has_box": out["has_box"], "box_iou": out["box_iou"]})["BA"].value


def test_box_accuracy_has_no_floor():
    """A map that misses every box scores BA 0 (with ≥, η = 0 kept the whole image and gave such a
    map the whole-image box's accuracy); a map equal to the box's indicator scores 100."""
    H = W = 32
    gt = torch.tensor([[2.0, 2.0, 12.0, 12.0]])  # pixels 2…11, the top-left corner
    miss = torch.zeros(2, H, W)
    miss[0, 20:30, 20:30] = 1.0                                                      # a blob in the opposite corner
    miss[1, 16:, 16:] = torch.linspace(0.2, 1.0, 16)[None, :] * torch.ones(16, 1)  # graded, still outside
    assert _box_accuracy(miss, [gt, gt]) == 0.0
    hit = torch.zeros(2, H, W)
    hit[:, 2:12, 2:12] = 1.0
    hit[1, 2:12, 2:12] = 0.3  # any level: {S > η} is the box for every η below it, and the best η counts
    assert _box_accuracy(hit, [gt, gt]) == 100.0
    # the whole-image box's IoU with this box is 100/1024 < 0.3: the old ≥ floor would not show
    # here; it shows for a large box, which the whole image hits at δ = 0.3 and 0.5
    big = torch.tensor([[0.0, 0.0, 24.0, 24.0]])  # 576/1024 of the image
    far = torch.zeros(1, H, W)
    far[0, 28:, 28:] = 1.0
    assert _box_accuracy(far, [big]) == 0.0


def test_pointing_with_and_without_tolerance():
    H = W = 64
    gt = torch.tensor([[10.0, 10.0, 20.0, 20.0]])  # covers pixels 10…19

    def hit(row, col, tolerance=15, ties="any"):
        s = torch.zeros(1, H, W)
        s[0, 40, 50] = 0.5
        s[0, row, col] = 1.0
        out = M.localization(s, [gt], tolerance=tolerance, ties=ties)
        return out["pointing"].item(), out["pointing_tol"].item()

    assert hit(15, 15) == (True, True)
    assert hit(15, 29) == (False, True)  # 10 px right of column 19
    assert hit(15, 34) == (False, True)  # exactly 15 px: inside the disc
    assert hit(15, 35) == (False, False)  # 16 px
    assert hit(19 + 12, 19 + 9) == (False, True)  # 9, 12 → 15
    assert hit(19 + 11, 19 + 11) == (False, False)  # 11, 11 → 15.6
    assert hit(15, 34, tolerance=20) == (False, True)


def test_pointing_ties():
    s = torch.zeros(1, 32, 32)
    s[0, 0, 0] = 1.0  # first maximum in raster order, outside the box
    s[0, 15, 15] = 1.0  # second maximum, inside
    gt = [torch.tensor([[10.0, 10.0, 20.0, 20.0]])]
    assert M.localization(s, gt, ties="any")["pointing"].item() is True
    assert M.localization(s, gt, ties="first")["pointing"].item() is False
    fake = torch.ones(1, 32, 32)
    fake[0, 0, 0] = 0  # Fake-CAM: every pixel but one is a maximum, so it always points inside
    assert M.localization(fake, gt)["pointing"].item() is True


def test_energy_recall_extremes():
    gt = [torch.tensor([[4.0, 2.0, 10.0, 8.0]])]
    U = torch.zeros(1, 12, 12)
    U[0, 2:8, 4:10] = 1
    out = M.localization(U, gt)
    assert out["energy"].item() == 1.0 and out["recall"].item() == 1.0
    half = U * 0.5
    half[0, 0, 0] = 1.0  # one pixel outside holds 1 of the 19 units of energy
    out = M.localization(half, gt)
    assert out["energy"].item() == pytest.approx(18 / 19)
    assert out["recall"].item() == pytest.approx(0.5)
    outside = 1 - U
    out = M.localization(outside, gt)
    assert out["energy"].item() == 0.0 and out["recall"].item() == 0.0


def test_flat_maps_get_no_credit_and_images_without_boxes_are_marked():
    maps = torch.zeros(3, 12, 12)
    maps[1] = 1.0
    maps[2, 3:6, 3:6] = 1.0
    boxes = [torch.tensor([[0.0, 0.0, 12.0, 12.0]]), torch.tensor([[0.0, 0.0, 12.0, 12.0]]), torch.zeros(0, 4)]
    out = M.localization(maps, boxes)
    assert out["has_box"].tolist() == [True, True, False]
    assert out["loc_iou"][:2].tolist() == [0.0, 0.0]  # would be 1 if {S ≥ mean} = everything counted
    assert out["pointing"].tolist() == [False, False, False]
    assert out["energy"][:2].tolist() == [0.0, 0.0]
    assert (out["box_iou"][:2] == 0).all()
    assert math.isnan(out["loc_iou"][2].item()) and torch.isnan(out["box_iou"][2]).all()
    assert math.isnan(out["energy"][2].item()) and math.isnan(out["recall"][2].item())


# ---------------------------------------------------------------------------------------------
# Saliency metric


def test_saliency_metric_closed_form():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(3, 16, 16, generator=gen, dtype=torch.float64) * 0.2
    bundle = linear_bundle(weight, 0.1)
    images = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    maps = torch.zeros(2, 16, 16)
    maps[0, 4:12, 2:10] = 1.0  # box (2, 4, 10, 12): area 64/256
    maps[1, 5:7, 9:11] = 1.0  # box (9, 5, 11, 7): area 4/256 < 0.05, floored
    targets = torch.tensor([1, 0])
    sm = M.localization(maps, [torch.zeros(0, 4)] * 2, targets=targets, bundle=bundle, images=images)["sm"]
    crops = [images[0:1, :, 4:12, 2:10], images[1:2, :, 5:7, 9:11]]
    for b, (crop, area, c) in enumerate(zip(crops, (64 / 256, 0.05), (1, 0))):
        resized = F.interpolate(crop, size=(16, 16), mode="bilinear", align_corners=False)
        z = closed_form_logit(weight, 0.1, resized)[0]
        log_p = F.logsigmoid(z if c == 1 else -z).item()
        assert sm[b].item() == pytest.approx(math.log(area) - log_p, abs=1e-9)
    none = M.localization(maps, [torch.zeros(0, 4)] * 2)["sm"]
    assert torch.isnan(none).all()  # without a model there is no class probability


# ---------------------------------------------------------------------------------------------
# Peers


def test_quantus_energy_and_pointing_agree():
    quantus = require("quantus")
    gen = torch.Generator().manual_seed(9)
    maps = F.interpolate(torch.rand(6, 1, 4, 4, generator=gen), size=(24, 24), mode="bilinear")[:, 0]
    maps[5] = 1.0
    maps[5, 0, 0] = 0.0  # Fake-CAM: ties everywhere
    boxes = [torch.tensor([[2.0, 3.0, 11.0, 20.0]]), torch.tensor([[12.0, 0.0, 24.0, 9.0], [0.0, 15.0, 6.0, 24.0]]),
             torch.tensor([[5.0, 5.0, 19.0, 19.0]]), torch.tensor([[0.0, 0.0, 24.0, 4.0]]),
             torch.tensor([[20.0, 20.0, 24.0, 24.0]]), torch.tensor([[8.0, 8.0, 9.0, 9.0]])]
    ours = M.localization(maps, boxes)
    U = M.union_mask(M.pad_boxes(boxes), (24, 24))
    x = np.zeros((6, 3, 24, 24), np.float32)
    y = np.zeros(6, np.int64)
    a = maps[:, None].numpy().astype(np.float64)
    s = U[:, None].numpy().astype(np.float64)
    mass = quantus.RelevanceMassAccuracy(abs=False, normalise=False, disable_warnings=True)(
        model=None, x_batch=x, y_batch=y, a_batch=a, s_batch=s)
    game = quantus.PointingGame(abs=False, normalise=False, disable_warnings=True)(
        model=None, x_batch=x, y_batch=y, a_batch=a, s_batch=s)
    assert np.allclose(ours["energy"].numpy(), np.asarray(mass, dtype=np.float64), atol=1e-6)
    assert ours["pointing"].tolist() == [bool(h) for h in game]
