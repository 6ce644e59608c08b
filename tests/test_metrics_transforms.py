"""Preprocessing and boxes: Resize(256)/CenterCrop(224) against torchvision for images and boxes,
clipping and dropping, grayscale, and the box masks' pixel-centre rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision import tv_tensors

from opticam_core import metrics as M
from opticam_core.boxes import near_boxes

SIZES = [(300, 451), (451, 300), (500, 500), (257, 1000), (341, 500), (224, 225), (1001, 333)]


@pytest.mark.parametrize("h,w", SIZES)
def test_geometry_and_pixels_match_torchvision(h, w):
    gen = torch.Generator().manual_seed(h * w)
    image = torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
    ours = M.preprocess(image)
    ref = TF.center_crop(TF.resize(image.float() / 255, [256], antialias=True), [224, 224])
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    assert torch.allclose(ours, ref.clamp(0, 1), atol=1e-6)
    g = M.crop_geometry(h, w)
    assert list(g.resized) == TF.get_size(TF.resize(image, [256], antialias=True))


def test_grayscale_and_alpha():
    gray = torch.randint(0, 256, (1, 300, 400), dtype=torch.uint8)
    out = M.preprocess(gray)
    assert out.shape == (3, 224, 224) and torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert torch.equal(M.preprocess(gray[0]), out)  # H×W
    rgba = torch.cat([torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8), torch.zeros(1, 300, 400, dtype=torch.uint8)])
    assert torch.equal(M.preprocess(rgba), M.preprocess(rgba[:3]))
    with pytest.raises(ValueError):
        M.preprocess(torch.zeros(5, 10, 10, dtype=torch.uint8))


@pytest.mark.parametrize("h,w", SIZES)
def test_boxes_follow_the_image_like_torchvision(h, w):
    gen = torch.Generator().manual_seed(h + w)
    xy0 = torch.rand(40, 2, generator=gen) * torch.tensor([w, h])
    wh = torch.rand(40, 2, generator=gen) * torch.tensor([w, h]) / 2 + 1
    boxes = torch.cat([xy0, (xy0 + wh).minimum(torch.tensor([w, h]))], 1)
    ours, dropped = M.transform_boxes(boxes, h, w)
    ref = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))
    ref = TF.center_crop(TF.resize(ref, [256], antialias=True), [224, 224])
    ref = TF.clamp_bounding_boxes(ref).as_subclass(torch.Tensor)
    keep = (ref[:, 2] > ref[:, 0]) & (ref[:, 3] > ref[:, 1])
    assert dropped == int((~keep).sum())
    assert torch.allclose(ours, ref[keep], atol=1e-3)


def test_boxes_are_clipped_and_vanishing_ones_counted():
    # 512×384 (w×h): resized to 341×256, crop left = round(117/2) = 58 (banker's), top = 16
    g = M.crop_geometry(384, 512)
    assert (g.resized, g.top, g.left) == ((256, 341), 16, 58)
    sx, sy = 341 / 512, 256 / 384  # each axis has its own factor (341 is truncated)
    boxes = torch.tensor([
        [0.0, 0.0, 512.0, 384.0],  # the whole image → the whole crop
        [0.0, 0.0, 50.0, 20.0],  # left of the crop and above it: gone
        [100.0, 100.0, 200.0, 150.0],  # inside
        [10.0, 100.0, 120.0, 150.0],  # cut by the left edge
        [300.0, 300.0, 300.0, 350.0],  # no width to start with
    ])
    out, dropped = M.transform_boxes(boxes, 384, 512)
    assert dropped == 2
    assert torch.allclose(out[0], torch.tensor([0.0, 0.0, 224.0, 224.0]))
    assert torch.allclose(out[1], torch.tensor([100 * sx - 58, 100 * sy - 16, 200 * sx - 58, 150 * sy - 16]), atol=1e-4)
    assert torch.allclose(out[2], torch.tensor([0.0, 100 * sy - 16, 120 * sx - 58, 150 * sy - 16]), atol=1e-4)


def test_box_masks_use_pixel_centres_and_tolerance_is_euclidean():
    padded = M.pad_boxes([torch.tensor([[2.0, 1.0, 5.0, 3.0], [7.4, 7.6, 7.6, 7.9]]), torch.zeros(0, 4),
                          torch.tensor([[0.4, 0.5, 1.6, 1.5]])])
    assert padded.shape == (3, 2, 4) and torch.isnan(padded[1]).all()
    U = M.union_mask(padded, (10, 10))
    want = torch.zeros(3, 10, 10, dtype=torch.bool)
    want[0, 1:3, 2:5] = True  # the thin second box holds no pixel centre
    want[2, 0:1, 0:2] = True  # centres 0.5, 1.5 in [0.4, 1.6) and 0.5 in [0.5, 1.5)
    assert torch.equal(U, want)
    near = near_boxes(padded, (10, 10), 2.5)
    ii, jj = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    for b in (0, 2):
        pts = want[b].nonzero()
        d2 = ((ii[..., None] - pts[:, 0]) ** 2 + (jj[..., None] - pts[:, 1]) ** 2).amin(-1)
        assert torch.equal(near[b], d2 <= 6.25)
    assert [t.shape[0] for t in M.unpad_boxes(padded)] == [2, 0, 1]


def test_iou():
    a = torch.tensor([0.0, 0.0, 4.0, 4.0])
    assert M.box_iou(a, torch.tensor([2.0, 2.0, 6.0, 6.0])).item() == pytest.approx(4 / 28)
    assert M.box_iou(a, torch.tensor([4.0, 0.0, 8.0, 4.0])).item() == 0.0
    assert M.box_iou(torch.zeros(4), torch.zeros(4)).item() == 0.0
    best = M.best_iou(torch.tensor([[[0.0, 0.0, 4.0, 4.0]]]), M.pad_boxes([torch.tensor([[9.0, 9, 10, 10], [0, 0, 4, 2]])]))
    assert best.item() == pytest.approx(0.5)
    assert np.isnan(M.best_iou(torch.zeros(1, 1, 4), torch.zeros(1, 0, 4)).item())
