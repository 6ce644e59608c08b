"""`compute`: one call per method and batch returns every FIELDS column the metrics own, equal to
the standalone functions, with the clean logits shared when the caller passes them."""

from __future__ import annotations

import pytest
import torch

from opticam_core import metrics as M
from tests import _toys


KIND_DTYPES = {"float": (torch.float64,), "int": (torch.int64,), "bool": (torch.bool,), "floats": (torch.float32,)}


@pytest.fixture(scope="module")
def batch():
    bundle = _toys.cnn_bundle()
    images = _toys.images(3, seed=2)
    targets = _toys.targets(3)
    maps = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    boxes = [torch.tensor([[2.0, 3.0, 20.0, 30.0]]), torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 8.0, 8.0], [20.0, 20.0, 32.0, 32.0]])]
    return bundle, images, targets, maps, boxes


def test_fields_names_kinds_and_values(batch):
    bundle, images, targets, maps, boxes = batch
    out = M.compute(bundle, images, targets, maps, boxes, steps=8, batch_size=10)
    owned = {"label", "pred", "p", "o", "insertion", "deletion", "insertion_curve", "deletion_curve", "has_box",
             "loc_iou", "pointing", "pointing_tol", "energy", "recall", "box_iou", "sm", "o_box_and_map",
             "o_map_minus_box", "o_box", "o_not_box"}
    assert set(out) == owned and owned <= set(M.FIELDS)
    for name, value in out.items():
        kind = M.FIELDS[name][0]
        assert value.dtype in KIND_DTYPES[kind], name
        assert value.shape[0] == 3 and value.dim() == (2 if kind == "floats" else 1), name
    assert out["box_iou"].shape == (3, 100) and out["insertion_curve"].shape == (3, 9)

    p, o = M.confidence(bundle, images, maps, targets)
    assert torch.equal(out["p"], p) and torch.equal(out["o"], o)
    ins, dele, curves = M.insertion_deletion(bundle, images, maps, steps=8)
    assert torch.allclose(out["insertion"], ins) and torch.allclose(out["deletion"], dele)
    assert torch.equal(out["pred"], curves["classes"])
    loc = M.localization(maps, boxes, targets=targets, bundle=bundle, images=images)
    for k, v in loc.items():
        assert torch.allclose(out[k].double(), v.double(), equal_nan=True), k
    study = M.box_study(bundle, images, maps, boxes, targets)
    for k, v in study.items():
        assert torch.allclose(out[k], v, equal_nan=True), k
    assert out["has_box"].tolist() == [True, False, True]


def test_clean_logits_are_shared_and_groups_selected(batch):
    bundle, images, targets, maps, boxes = batch
    with torch.no_grad():
        logits = bundle.model(images)
    a = M.compute(bundle, images, targets, maps, None, which=("classification",), clean_logits=logits)
    assert set(a) == {"label", "pred", "p", "o"}
    b = M.compute(bundle, images, targets, maps, None, which=("classification",))
    assert all(torch.equal(a[k], b[k]) for k in a)
    shifted = logits.clone()
    shifted[:, 0] += 100.0  # says every image is class 0: the given logits, not a new forward, decide
    c = M.compute(bundle, images, targets, maps, None, which=("classification", "localization"), clean_logits=shifted)
    assert c["pred"].tolist() == [0, 0, 0]
    assert not c["has_box"].any() and torch.isnan(c["loc_iou"]).all()
    with pytest.raises(ValueError, match="unknown metric group"):
        M.compute(bundle, images, targets, maps, None, which=("speed",))
