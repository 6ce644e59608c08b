"""The job's CPU decode stage (`pipeline.decode`): the Evaluator given prepared samples makes the
same rows as given raw ones (bit for bit: float32 pixels both ways), a sample that cannot be
decoded still becomes rows with `error` set, boxes follow the image's resize and crop, and a
dataset's own preprocessing is honoured."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from opticam_core.transforms import transform_boxes
from pipeline.decode import PIXEL_DTYPE, decode_batch, geometry, unpack
from pipeline.evaluate import Evaluator
from pipeline.schema import SAMPLES, todo_entry
from tests._samples import TOY_METHODS, TOY_METRICS, TOY_MODEL, awkward_rows, photo_rows

#: Columns that differ between two calls whatever the input (wall time, creation time).
VOLATILE = ("created", "seconds")


def table(rows) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SAMPLES)


def comparable(out: pa.Table) -> list[dict]:
    """The rows, sorted, with NaN written so that equal rows compare equal."""
    def value(v):
        if isinstance(v, float) and math.isnan(v):
            return "nan"
        return [value(x) for x in v] if isinstance(v, list) else v

    rows = [{k: value(v) for k, v in r.items()} for r in out.drop_columns(list(VOLATILE)).to_pylist()]
    return sorted(rows, key=lambda r: (r["sample_id"], r["method"], r["target"]))


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator(run_id="r1", dataset="toy", model=TOY_MODEL, methods=TOY_METHODS, metrics=TOY_METRICS,
                     device="cpu")


def test_geometry_is_the_actors(evaluator):
    # the stage prepares for the model the actor loads, without loading it
    g = geometry(TOY_MODEL)
    assert (g["resize"], g["size"]) == (evaluator.bundle.resize, evaluator.bundle.input_size)
    assert geometry(TOY_MODEL, {"resize": 96}) == {"resize": (96, 96), "size": (96, 96)}
    assert geometry(TOY_MODEL, {"resize": 80, "crop": 64}) == {"resize": 80, "size": (64, 64)}


def test_prepared_samples_give_the_same_rows_as_raw_ones(evaluator):
    raw = table(photo_rows(3, seed=2) + awkward_rows())
    prepared = decode_batch(raw, **geometry(TOY_MODEL))
    assert "image" not in prepared.column_names and "boxes" not in prepared.column_names
    assert prepared.num_rows == raw.num_rows  # nothing dropped, failures included
    want, got = evaluator(raw), evaluator(prepared)
    assert got.schema.equals(want.schema)
    assert comparable(got) == comparable(want)  # every value, maps' PNGs and errors included
    assert len(want) == raw.num_rows * len(TOY_METHODS)


def test_decode_errors_become_rows(evaluator):
    rows = awkward_rows()
    prepared = decode_batch(table(rows), **geometry(TOY_MODEL))
    errors = dict(zip(prepared.column("sample_id").to_pylist(), prepared.column("decode_error").to_pylist()))
    pixels = dict(zip(prepared.column("sample_id").to_pylist(), prepared.column("pixels").to_pylist()))
    for sid in ("garbage", "empty", "nan_tiff"):
        assert errors[sid] and pixels[sid] is None
    for sid in ("grayscale", "cmyk", "sixteen_bit", "bad_label"):  # the label is the actor's to judge
        assert errors[sid] is None and len(pixels[sid]) == 3 * 224 * 224 * np.dtype(PIXEL_DTYPE).itemsize
    out = evaluator(prepared).to_pandas()
    for sid in ("garbage", "empty", "nan_tiff", "bad_label"):
        mine = out[out.sample_id == sid]
        assert len(mine) == len(TOY_METHODS) and mine.error.notna().all()
    assert out[out.sample_id == "garbage"].error.str.contains("not a decodable image").all()
    assert out[out.sample_id == "grayscale"].error.isna().all()


def test_boxes_follow_the_resize_and_crop(evaluator):
    rows = photo_rows(2, seed=1, size=(60, 90))
    rows[1]["boxes"] = [{"x0": 0.0, "y0": 0.0, "x1": 5.0, "y1": 5.0},      # outside the centre crop
                        {"x0": 20.0, "y0": 10.0, "x1": 70.0, "y1": 50.0}]
    g = geometry(TOY_MODEL)
    prepared = decode_batch(table(rows), **g)
    images, boxes, dropped, errors = unpack(prepared, g["size"])
    assert errors == [None, None]
    for row, got, n in zip(rows, boxes, dropped):
        coords = [[b["x0"], b["y0"], b["x1"], b["y1"]] for b in row["boxes"]]
        want, want_dropped = transform_boxes(coords, 60, 90, **g)
        assert torch.equal(got, want) and n == want_dropped
    assert dropped == [0, 1]
    out = evaluator(prepared).to_pandas()
    assert out.groupby("sample_id").boxes_dropped.first().tolist() == [0, 1]


def test_a_datasets_preprocessing_is_honoured():
    spec = {"resize": 96}  # the medical models' direct resize, aspect not kept
    ev = Evaluator(run_id="r1", dataset="toy", model=TOY_MODEL, methods={"gradcam": {}},
                   metrics={"classification": {}, "box_study": {}}, device="cpu", preprocess=spec)
    raw = table(photo_rows(2, seed=3))
    prepared = decode_batch(raw, **geometry(TOY_MODEL, spec))
    images, *_ = unpack(prepared, (96, 96))
    assert images[0].shape == (3, 96, 96)
    assert comparable(ev(prepared)) == comparable(ev(raw))


def test_pixels_of_another_geometry_are_an_error_row_not_a_crash(evaluator):
    prepared = decode_batch(table(photo_rows(2)), **geometry(TOY_MODEL, {"resize": 64}))
    out = evaluator(prepared).to_pandas()
    assert len(out) == 2 * len(TOY_METHODS)
    assert out.error.str.contains("expected").all()


def test_todo_subset_on_prepared_samples(evaluator):
    raw = table(photo_rows(3, seed=4))
    todo = pa.array([todo_entry("gradcam"), None, f"{todo_entry('fakecam')},{todo_entry('gradcam')}"], pa.string())
    raw = raw.append_column("todo", todo)
    prepared = decode_batch(raw, **geometry(TOY_MODEL))
    assert prepared.column("todo").to_pylist() == todo.to_pylist()
    want, got = comparable(evaluator(raw)), comparable(evaluator(prepared))
    assert got == want and len(got) == 3
