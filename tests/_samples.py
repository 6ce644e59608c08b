"""Small sample sets in the samples schema, for the job's tests: synthetic photos with boxes,
plus the awkward files real datasets contain (grayscale, CMYK, 16-bit, 1 pixel, NaN, garbage)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.schema import SAMPLES

#: A tiny timm network with random weights: the job's plumbing, not the model, is under test.
TOY_MODEL = {"name": "test_efficientnet", "weights": None, "layer": "bn2"}
#: Cheap settings that still run every method's and every metric's code path.
TOY_METHODS = {"fakecam": {}, "gradcam": {}, "opticam": {"iterations": 3}}
TOY_METRICS = {"classification": {}, "insertion_deletion": {"steps": 4}, "localization": {}, "box_study": {}}


def encode(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    img.save(buf, format=fmt)
    return buf.getvalue()


def photo_rows(n: int, *, dataset: str = "toy", seed: int = 0, size=(48, 64)) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        h, w = size
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        rows.append(dict(sample_id=f"img{i:04d}", dataset=dataset, split="val", image=encode(arr),
                         label=int(i % 10), label_name=f"class{i % 10}",
                         boxes=[{"x0": 4.0, "y0": 6.0, "x1": w / 2, "y1": h - 6.0}], width=w, height=h))
    return rows


def awkward_rows() -> list[dict]:
    """Files a real dataset holds: each must give rows (correct ones or rows with `error`)."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    gray16 = (rng.integers(0, 65536, (40, 50))).astype(np.uint16)
    nan = np.full((40, 50), np.nan, dtype=np.float32)
    buf = io.BytesIO()
    Image.fromarray(nan, mode="F").save(buf, format="TIFF")

    def row(sid, data, w=50, h=40, label=3):
        return dict(sample_id=sid, dataset="toy", split="val", image=data, label=label, label_name="x",
                    boxes=[], width=w, height=h)

    return [
        row("grayscale", encode(rgb[..., 0])),
        row("cmyk", encode(rgb, "JPEG", mode="CMYK")),
        row("sixteen_bit", encode(gray16)),
        row("one_pixel", encode(rgb[:1, :1]), w=1, h=1),
        row("nan_tiff", buf.getvalue()),
        row("garbage", b"this is not an image"),
        row("empty", b""),
        row("bad_label", encode(rgb), label=5000),
    ]


def write_samples(path: Path, rows: list[dict], *, row_group: int = 4) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=SAMPLES)
    pq.write_table(table, path / "part-00000.parquet", row_group_size=row_group)
    return path


def toy_config(samples: str, output: str, *, methods=None, actors: int = 1, batch_size: int = 4,
               limit=None, name: str = "toy") -> dict:
    return {
        "output": output,
        "datasets": [{"name": name, "uri": samples, "limit": limit}],
        "models": [dict(TOY_MODEL)],
        "methods": methods or dict(TOY_METHODS),
        "metrics": dict(TOY_METRICS),
        "compute": {"batch_size": batch_size, "actors": actors, "cpus_per_actor": 1},
        "save_maps": "png",
    }
