"""`compute`: one call per method and batch returns every field the metric groups declare, equal
to the standalone functions, with the clean logits shared when the caller passes them, and each
group run with its own options only."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opticam_core import metrics as M
from opticam_core.fields import per_image_fields
from opticam_core.options import OptionsError
from tests import _toys

KIND_DTYPES = {"float64": (torch.float64,), "int64": (torch.int64,), "bool": (torch.bool,),
               "list<float32>": (torch.float32,)}


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
    out = M.compute(bundle, images, targets, maps, boxes, which={
        "classification": {}, "insertion_deletion": {"steps": 8, "batch_size": 10},
        "localization": {"batch_size": 10}, "box_study": {"batch_size": 10}})
    owned = {"label", "pred", "p", "o", "insertion", "deletion", "insertion_curve", "deletion_curve", "has_box",
             "loc_iou", "pointing", "pointing_tol", "energy", "recall", "box_iou", "sm", "o_box_and_map",
             "o_map_minus_box", "o_box", "o_not_box"}
    fields = per_image_fields()
    assert set(out) == owned and owned <= set(fields)
    named = ("classification", "insertion_deletion", "localization", "box_study")
    assert set(out) == {"label", "pred", "p"} | {f.name for g in named for f in M.GROUPS[g].fields}
    for name, value in out.items():
        kind = fields[name].kind
        assert value.dtype in KIND_DTYPES[kind], name
        assert value.shape[0] == 3 and value.dim() == (2 if kind == "list<float32>" else 1), name
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


def test_each_group_gets_its_own_options(batch):
    """batch_size under localization must not reach insertion/deletion (it did when the groups'
    options were merged into one dict): insertion/deletion's 2·8−1 = 15 step images per image
    go through in chunks of its own batch_size, SM's crops one at a time."""
    bundle, images, targets, maps, boxes = batch
    counting = _toys.Counting(bundle.model)
    probe = dataclasses.replace(bundle, model=counting)
    M.compute(probe, images[:2], targets[:2], maps[:2], boxes[:2], clean_logits=bundle.model(images[:2]).detach(),
              which={"insertion_deletion": {"steps": 8, "batch_size": 30}, "localization": {"batch_size": 1}})
    # insertion/deletion: 30 step images in one forward, then the shared black image; SM: 2 crops of 1
    assert counting.sizes == [30, 1, 1, 1], counting.sizes


def test_options_are_typed_and_checked_per_group(batch):
    bundle, images, targets, maps, boxes = batch
    with pytest.raises(OptionsError) as info:
        M.compute(bundle, images, targets, maps, boxes, which={
            "insertion_deletion": {"steps": "8", "blur": [10, 5.0]}, "localization": {"steps": 8, "ties": "all"}})
    msg = str(info.value)
    assert "metrics.insertion_deletion.steps: Input should be a valid integer, got '8'" in msg
    assert "metrics.insertion_deletion.blur[0]: the blur kernel's size must be odd" in msg
    assert "metrics.localization.steps: unknown field; allowed: tolerance, thresholds" in msg
    assert "metrics.localization.ties: Input should be 'any' or 'first', got 'all'" in msg
