"""The actor's logic in-process (no Ray): rows, identifiers, parity with calling opticam_core
directly, and nothing lost on awkward samples or failing methods."""

from __future__ import annotations

import io
import logging

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from opticam_core import explain
from opticam_core.metrics import compute, preprocess
from pipeline import evaluate
from pipeline.evaluate import Evaluator
from pipeline.images import decode_image
from pipeline.schema import RESULTS, SAMPLES
from tests._samples import (
    TOY_METHODS,
    TOY_METRICS,
    TOY_MODEL,
    awkward_rows,
    encode,
    photo_rows,
)


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator(run_id="r1", dataset="toy", model=TOY_MODEL, methods=TOY_METHODS, metrics=TOY_METRICS,
                     device="cpu")


def table(rows):
    return pa.Table.from_pylist(rows, schema=SAMPLES)


def test_one_row_per_sample_and_method_with_identifiers(evaluator):
    rows = photo_rows(3)
    out = evaluator(table(rows))
    assert out.schema.equals(RESULTS)
    df = out.to_pandas()
    assert len(df) == 3 * len(TOY_METHODS)
    assert set(zip(df.sample_id, df.method)) == {(r["sample_id"], m) for r in rows for m in TOY_METHODS}
    assert (df.run_id == "r1").all() and (df.dataset == "toy").all() and (df.model == "test_efficientnet").all()
    assert (df.layer == "bn2").all()
    assert df.error.isna().all()
    assert ((df.p > 0) & (df.p <= 1) & (df.o >= 0) & (df.o <= 1)).all()
    opt = df[df.method == "opticam"]
    assert (opt.iterations == 3).all() and opt.objective_history.map(len).eq(3).all()
    assert df[df.method == "gradcam"].iterations.isna().all()


def test_rows_equal_direct_calls_and_png_is_the_map(evaluator):
    rows = photo_rows(2, seed=5)
    df = evaluator(table(rows)).to_pandas().set_index(["sample_id", "method"])
    images = torch.stack([preprocess(decode_image(r["image"])) for r in rows])
    targets = torch.tensor([r["label"] for r in rows])
    ex = explain(evaluator.bundle, images, targets, "gradcam")
    direct = compute(evaluator.bundle, images, targets, ex.maps, None,
                     which={"classification": {}, "insertion_deletion": TOY_METRICS["insertion_deletion"]})
    for i, r in enumerate(rows):
        row = df.loc[(r["sample_id"], "gradcam")]
        assert row.p == pytest.approx(direct["p"][i].item(), rel=1e-5)
        assert row.o == pytest.approx(direct["o"][i].item(), rel=1e-4, abs=1e-6)
        assert row.insertion == pytest.approx(direct["insertion"][i].item(), rel=1e-4, abs=1e-6)
        png = np.asarray(Image.open(io.BytesIO(row.map_png)))
        assert png.shape == (224, 224)
        assert np.abs(png / 255.0 - ex.maps[i].numpy()).max() <= 0.5 / 255 + 1e-6
    fake = np.asarray(Image.open(io.BytesIO(df.loc[(rows[0]["sample_id"], "fakecam")].map_png)))
    assert fake[0, 0] == 0 and (fake.flatten()[1:] == 255).all()


def test_boxes_follow_the_image_through_resize_and_crop(evaluator):
    # A 100×200 image: resized to 256×512, cropped at x 144; a box on the right half maps there.
    arr = np.zeros((100, 200, 3), dtype=np.uint8)
    row = dict(sample_id="wide", dataset="toy", split="val", image=encode(arr), label=1, label_name="x",
               boxes=[{"x0": 100.0, "y0": 0.0, "x1": 200.0, "y1": 100.0}], width=200, height=100)
    prep = evaluator.prepare([row["image"]], [row["boxes"]])
    # x: 100·2.56 − 144 = 112, 512 − 144 → clipped to 224; y: 0 − 16 → 0, 256 − 16 → clipped to 224.
    assert prep.boxes[0].tolist() == [[112.0, 0.0, 224.0, 224.0]]


def test_awkward_samples_cost_rows_not_the_batch(evaluator):
    rows = awkward_rows() + photo_rows(1)
    df = evaluator(table(rows)).to_pandas()
    assert len(df) == len(rows) * len(TOY_METHODS)  # nothing lost
    err = df.groupby("sample_id").error.apply(lambda e: e.notna().all())
    ok = df.groupby("sample_id").error.apply(lambda e: e.isna().all())
    for sid in ("grayscale", "cmyk", "sixteen_bit", "one_pixel", "img0000"):
        assert ok[sid], f"{sid} should be evaluated, got {df[df.sample_id == sid].error.iloc[0]}"
    for sid in ("nan_tiff", "garbage", "empty", "bad_label"):
        assert err[sid], f"{sid} should carry an error"
    msgs = df.drop_duplicates("sample_id").set_index("sample_id").error
    assert "decodable" in msgs["garbage"] and "empty" in msgs["empty"]
    assert "non-finite" in msgs["nan_tiff"] and "5000" in msgs["bad_label"]


def test_decode_scales_16_bit_and_keeps_8_bit():
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    assert decode_image(encode(arr))[0].tolist() == [[0, 128, 255]]
    rgb = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert torch.equal(decode_image(encode(rgb)), torch.from_numpy(rgb).permute(2, 0, 1))


def test_only_the_missing_rows_are_computed(evaluator):
    batch = table(photo_rows(3)).append_column("todo", pa.array(["gradcam", "", "fakecam,opticam"]))
    df = evaluator(batch).to_pandas()
    assert sorted(zip(df.sample_id, df.method)) == [("img0000", "gradcam"), ("img0002", "fakecam"),
                                                     ("img0002", "opticam")]


def test_a_method_failing_on_one_image_costs_only_its_rows(evaluator, monkeypatch, caplog):
    real = evaluate.explain
    rows = photo_rows(3, seed=9)
    poison = preprocess(decode_image(rows[1]["image"]))

    def flaky(bundle, images, targets, method, **options):
        if method == "gradcam" or (isinstance(method, list) and "gradcam" in method):
            if any(torch.equal(img, poison) for img in images):
                raise RuntimeError("boom on img0001")
        return real(bundle, images, targets, method, **options)

    monkeypatch.setattr(evaluate, "explain", flaky)
    with caplog.at_level(logging.WARNING, logger="pipeline.evaluate"):
        df = evaluator(table(rows)).to_pandas().set_index(["sample_id", "method"])
    # the shared call's failure is not swallowed: one warning for the batch, naming the methods
    warnings = [r.getMessage() for r in caplog.records if r.name == "pipeline.evaluate"]
    assert len(warnings) == 1, warnings
    assert "3 images with " + ", ".join(TOY_METHODS) + " together failed" in warnings[0]
    assert "RuntimeError: boom on img0001" in warnings[0]
    assert len(df) == 3 * len(TOY_METHODS)
    assert "boom" in df.loc[("img0001", "gradcam")].error
    assert df.drop(("img0001", "gradcam")).error.isna().all()
