"""The embedded demo's samples: real packaged photos, their ImageNet labels and hand-made boxes."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.demo import samples as demo_samples
from pipeline.demo.samples import DemoPhotoError, demo_rows, write_demo_samples
from pipeline.schema import SAMPLES

# The classifier's top-1 is the label for these photos (see photos.csv for the other two: the
# astronaut photo's label is the small model shuttle, Grace Hopper's the uniform).
CLASSIFIER_TOP1 = {"chelsea", "coffee", "rocket", "motorcycle_left", "china"}
EXPECTED_PHOTOS = {"chelsea", "coffee", "astronaut", "rocket", "motorcycle_left", "china", "grace_hopper"}


@pytest.fixture(scope="module")
def rows():
    return demo_rows()


@pytest.fixture(scope="module")
def imagenet():
    from timm.data import ImageNetInfo

    return ImageNetInfo()


def test_rows_follow_the_samples_schema(rows):
    assert {r["sample_id"] for r in rows} == EXPECTED_PHOTOS
    assert len(rows) == len(EXPECTED_PHOTOS)  # unique ids
    for r in rows:
        assert list(r) == SAMPLES.names
        assert r["dataset"] == "demo" and r["split"] == "demo"
        assert isinstance(r["image"], bytes) and isinstance(r["label"], int)
    table = pa.Table.from_pylist(rows, schema=SAMPLES)  # raises on a type that does not fit
    assert table.num_rows == len(rows)


def test_images_are_the_shipped_files_at_their_stated_size(rows):
    for r in rows:
        im = Image.open(io.BytesIO(r["image"]))
        assert im.format in ("PNG", "JPEG"), r["sample_id"]
        im.load()  # a full decode, not just the header
        assert im.mode == "RGB", r["sample_id"]
        assert im.size == (r["width"], r["height"]), r["sample_id"]


def test_pixels_are_the_originals(rows):
    """The bytes decode to exactly the pixels scikit-image's own loaders return (no resampling,
    no lossy re-encoding), so boxes drawn on those pixels stay valid."""
    import skimage.data as data

    originals = {"chelsea": data.chelsea(), "coffee": data.coffee(), "astronaut": data.astronaut(),
                 "rocket": data.rocket(), "motorcycle_left": data.stereo_motorcycle()[0]}
    by_id = {r["sample_id"]: r for r in rows}
    for sid, pixels in originals.items():
        decoded = np.asarray(Image.open(io.BytesIO(by_id[sid]["image"])).convert("RGB"))
        np.testing.assert_array_equal(decoded, pixels, err_msg=sid)


def test_boxes_are_inside_their_images_and_not_trivial(rows):
    for r in rows:
        assert r["boxes"], f"{r['sample_id']} has no box"
        for b in r["boxes"]:
            assert 0 <= b["x0"] < b["x1"] <= r["width"], (r["sample_id"], b)
            assert 0 <= b["y0"] < b["y1"] <= r["height"], (r["sample_id"], b)
        # A box as large as the image would make every localization metric vacuous.
        union = np.zeros((r["height"], r["width"]), bool)
        for b in r["boxes"]:
            union[int(b["y0"]):int(b["y1"]), int(b["x0"]):int(b["x1"])] = True
        assert union.mean() < 0.95, r["sample_id"]


def test_labels_agree_with_the_imagenet_class_list(rows, imagenet):
    wnids = imagenet.label_names()
    assert len(wnids) == 1000 and wnids == sorted(wnids)  # sorted-WordNet-id order, as torchvision/timm
    table = {p["sample_id"]: p for p in demo_samples._photo_table()}
    for r in rows:
        assert 0 <= r["label"] < 1000
        assert imagenet.index_to_label_name(r["label"]) == table[r["sample_id"]]["wnid"], r["sample_id"]
        assert imagenet.index_to_description(r["label"]) == r["label_name"], r["sample_id"]


def test_the_real_classifier_agrees_where_the_data_file_says_it_does(rows):
    """Guards the class indices themselves: an off-by-one or another class order would break
    every one of these top-1s."""
    import torch
    import torch.nn.functional as F

    from opticam_core import load_model

    bundle = load_model("efficientnet_lite0")
    batch = []
    for r in rows:
        x = torch.from_numpy(np.array(Image.open(io.BytesIO(r["image"])).convert("RGB"))).permute(2, 0, 1)
        x = x.float().div(255).unsqueeze(0)
        h, w = x.shape[-2:]
        s = 256 / min(h, w)
        x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
        batch.append(x[..., top:top + 224, left:left + 224].clamp(0, 1))
    with torch.no_grad():
        pred = bundle.model(torch.cat(batch)).argmax(1).tolist()
    agree = {r["sample_id"] for r, p in zip(rows, pred) if p == r["label"]}
    assert agree == CLASSIFIER_TOP1


def test_write_demo_samples_round_trips(rows, tmp_path):
    path = write_demo_samples(tmp_path / "samples")
    assert path.is_file() and path.parent == tmp_path / "samples"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    meta = pq.ParquetFile(path)
    assert meta.schema_arrow == SAMPLES
    assert meta.metadata.num_row_groups == len(rows)  # small row groups: Ray can split the read
    assert pq.read_table(path).to_pylist() == pa.Table.from_pylist(rows, schema=SAMPLES).to_pylist()
    assert write_demo_samples(tmp_path / "samples") == path  # rewriting replaces, never appends
    assert pq.read_table(path).num_rows == len(rows)


def test_a_photo_of_another_size_is_refused(monkeypatch):
    """Boxes belong to the pixels they were drawn on: a package that ships a resized photo must
    stop the demo, not silently shift every box."""
    real = demo_samples._photo_table

    def resized():
        table = real()
        table[0]["width"] += 1
        return table

    monkeypatch.setattr(demo_samples, "_photo_table", resized)
    with pytest.raises(DemoPhotoError, match="boxes were drawn at"):
        demo_rows()
