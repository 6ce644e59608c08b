"""Small synthetic runs, schema-exact and in the job's real layout, for report/notebook tests.

    OUTPUT/run=RUN_ID/_run.json
    OUTPUT/run=RUN_ID/dataset=D/model=M/part-0.parquet      (pipeline.schema.RESULTS)
    SAMPLES_ROOT/D/part-0.parquet                             (pipeline.schema.SAMPLES)

The values are random but plausible (p, o in (0,1); curves that start and end where they should;
box IoUs that fall with the threshold; Opti-CAM histories that rise and stop), and every special
case the report must survive is planted on purpose: failed rows (`error` set, metrics null),
images without boxes (localization and box-study fields null), constant maps (an all-zero PNG,
`constant` true). Tests that need exact numbers pass `edit=` to overwrite columns before writing.

    spec = make_run(tmp_path / "out", "r1", datasets={"toy": 12}, methods=("fakecam", "gradcam", "opticam"))
    spec.uri, spec.rows (the DataFrame written, errors included), spec.samples["toy"]
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.schema import RESULTS, SAMPLES

SIZE = 224
THRESHOLDS = 100
LAYERS = {"resnet50": "layer4", "vgg16_bn": "features.42", "vit_base_patch16_224": "blocks.11.norm1",
          "deit_base_patch16_224": "blocks.11.norm1", "efficientnet_lite0": "bn2"}
CLASSES = ["tench", "goldfish", "great_white_shark", "tiger_shark", "hammerhead"]


@dataclass
class RunSpec:
    output: Path                      # the output root
    run_id: str
    path: Path                        # output/run=ID
    rows: pd.DataFrame                # every row written (error rows included), map_png kept
    samples: dict[str, Path] = field(default_factory=dict)   # dataset → samples folder
    manifest: dict = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return str(self.path)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def blob_map(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A smooth 8-bit map with one Gaussian blob (what a CAM looks like, roughly)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    s = rng.uniform(0.1, 0.3) * size
    m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    m = (m - m.min()) / (m.max() - m.min())
    return np.round(m * 255).astype(np.uint8)


def make_samples(folder: Path, dataset: str, n: int, *, seed: int = 0, split: str = "val",
                 no_box: Iterable[int] = ()) -> Path:
    """A samples shard: `n` small PNG photos (sizes vary), labels, boxes (none for `no_box`)."""
    rng = np.random.default_rng([seed, zlib.crc32(dataset.encode())])
    no_box = set(no_box)
    rows = []
    for i in range(n):
        w, h = int(rng.integers(60, 120)), int(rng.integers(50, 110))
        img = (rng.uniform(0, 1, (h, w, 3)) * 80 + np.linspace(0, 170, w)[None, :, None]).astype(np.uint8)
        label = i % len(CLASSES)
        boxes = [] if i in no_box else [{"x0": float(w * 0.2), "y0": float(h * 0.25),
                                         "x1": float(w * 0.7), "y1": float(h * 0.8)}]
        rows.append({"sample_id": f"{dataset}-{i:04d}", "dataset": dataset, "split": split,
                     "image": _rgb_png(img), "label": label,
                     "label_name": CLASSES[label], "boxes": boxes, "width": w, "height": h})
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLES), folder / "part-0.parquet", row_group_size=256)
    return folder


def _rgb_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def _curve(rng, start: float, end: float, steps: int) -> np.ndarray:
    t = np.linspace(0, 1, steps + 1)
    shape = t ** rng.uniform(0.3, 2.0)
    c = start + (end - start) * shape + rng.normal(0, 0.01, steps + 1)
    return np.clip(c, 0, 1).astype(np.float32)


def _auc(curve: np.ndarray) -> float:
    return float(np.trapezoid(curve, np.linspace(0, 1, len(curve))))


#: How much each method's masked probability o moves from p, roughly as in the paper's story.
O_FACTOR = {"fakecam": (0.97, 1.03), "gradcam": (0.4, 1.2), "gradcampp": (0.4, 1.15),
            "scorecam": (0.5, 1.25), "xgradcam": (0.4, 1.2), "layercam": (0.3, 1.1),
            "hirescam": (0.4, 1.2), "ablationcam": (0.4, 1.2), "extremal": (0.2, 1.1), "opticam": (0.9, 1.6)}


#: What a failed row lacks: everything the metrics and the method would have produced.
FAILED_NULL = [c for c in RESULTS.names if c not in
               ("run_id", "dataset", "split", "sample_id", "model", "layer", "method", "label_name", "label",
                "options", "error", "created")]


def synthetic_rows(run_id: str, dataset: str, n: int, models: Iterable[str], methods: Iterable[str], *,
                   seed: int = 0, split: str = "val", no_box: Iterable[int] = (), failed: Iterable[tuple] = (),
                   constant: Iterable[tuple] = (), steps: int = 16, iterations: int = 20, maps: bool = True,
                   created: datetime | None = None) -> pd.DataFrame:
    """Rows for `n` images × models × methods. `failed`/`constant`: (model, method, image index)."""
    no_box, failed, constant = set(no_box), set(failed), set(constant)
    created = created or datetime(2026, 1, 1, tzinfo=timezone.utc)
    out = []
    for model in models:
        rs = np.random.default_rng([seed, zlib.crc32(f"{dataset}/{model}".encode())])
        p = rs.uniform(0.3, 0.98, n)
        pred = np.arange(n) % len(CLASSES)
        wrong = rs.uniform(size=n) < 0.2
        pred[wrong] = (pred[wrong] + 1) % len(CLASSES)
        o_box, o_not_box = rs.uniform(0.05, 0.6, n), rs.uniform(0.05, 0.8, n)
        for method in methods:
            rng = np.random.default_rng([seed, zlib.crc32(f"{dataset}/{model}/{method}".encode())])
            lo, hi = O_FACTOR.get(method, (0.5, 1.2))
            for i in range(n):
                label = i % len(CLASSES)
                row = {c: None for c in RESULTS.names}
                row.update(run_id=run_id, dataset=dataset, split=split, sample_id=f"{dataset}-{i:04d}",
                           model=model, layer=LAYERS.get(model, "layer4"), method=method,
                           label_name=CLASSES[label], label=label, created=created + timedelta(seconds=i),
                           options=json.dumps({"iterations": iterations} if method == "opticam" else {}))
                o = float(np.clip(p[i] * rng.uniform(lo, hi), 1e-4, 0.9999))
                ins = _curve(rng, rng.uniform(0.0, 0.2), p[i], steps)
                dele = _curve(rng, p[i], rng.uniform(0.0, 0.1), steps)
                is_const = (model, method, i) in constant
                row.update(pred=int(pred[i]), p=float(p[i]), o=o,
                           insertion=_auc(ins), deletion=_auc(dele),
                           insertion_curve=ins.tolist(), deletion_curve=dele.tolist(),
                           constant=is_const, seconds=float(rng.uniform(0.01, 0.05) * (40 if method == "opticam" else 1)))
                boxed = i not in no_box
                row["has_box"] = boxed
                if boxed:
                    iou = np.clip(np.linspace(rng.uniform(0.3, 0.9), 0, THRESHOLDS) + rng.normal(0, 0.02, THRESHOLDS), 0, 1)
                    row.update(loc_iou=float(rng.uniform(0, 1)), pointing=bool(rng.uniform() < 0.7),
                               pointing_tol=bool(rng.uniform() < 0.8), energy=float(rng.uniform(0.2, 0.8)),
                               recall=float(rng.uniform(0.1, 0.9)), box_iou=iou.astype(np.float32).tolist(),
                               sm=float(rng.uniform(0.5, 2.0)),
                               o_box_and_map=float(rng.uniform(0.01, 0.5)), o_map_minus_box=float(rng.uniform(0.01, 0.7)),
                               o_box=float(o_box[i]), o_not_box=float(o_not_box[i]))
                if method == "opticam":
                    stop = int(rng.integers(iterations // 2, iterations + 1))
                    start = float(rng.uniform(1, 5))
                    hist = start + rng.uniform(2, 6) * (1 - np.exp(-np.arange(1, iterations + 1) / 5))
                    hist[stop:] = np.nan
                    row.update(iterations=stop, objective=float(hist[stop - 1]), objective_start=start,
                               early_stopped=stop < iterations, objective_history=hist.astype(np.float32).tolist())
                if maps:
                    row["map_png"] = png_bytes(np.zeros((SIZE, SIZE)) if is_const else blob_map(rng))
                if (model, method, i) in failed:  # values drawn anyway: other rows stay the same
                    row.update({c: None for c in FAILED_NULL}, error="RuntimeError: synthetic failure")
                out.append(row)
    return pd.DataFrame(out, columns=RESULTS.names)


def write_rows(path: Path, rows: pd.DataFrame) -> None:
    """Write rows in the job's layout under a run folder, one file per dataset × model."""
    for (dataset, model), part in rows.groupby(["dataset", "model"], sort=True):
        folder = path / f"dataset={dataset}" / f"model={model}"
        folder.mkdir(parents=True, exist_ok=True)
        records = part.astype(object).where(part.notna(), None).to_dict("records")
        for r in records:  # list columns: NaN inside lists must stay NaN, not None
            for c in ("insertion_curve", "deletion_curve", "box_iou", "objective_history"):
                if r[c] is not None and not isinstance(r[c], list):
                    r[c] = list(r[c])
        pq.write_table(pa.Table.from_pylist(records, schema=RESULTS), folder / "part-0.parquet")


def make_run(output: Path, run_id: str = "r1", *, datasets: dict[str, int] | None = None,
             models: Iterable[str] = ("resnet50",), methods: Iterable[str] = ("fakecam", "gradcam", "opticam"),
             seed: int = 0, started: datetime | None = None, samples_root: Path | None = None,
             no_box: Iterable[int] = (1,), failed: Iterable[tuple] | None = None,
             constant: Iterable[tuple] | None = None, maps: bool = True, steps: int = 16, iterations: int = 20,
             split: str = "val", edit: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
             manifest: bool = True) -> RunSpec:
    """A complete run under `output` (see the module docstring).

    Defaults plant one failed row (first model, first non-fake method, image 2), one constant
    map (first model, gradcam if present, image 3) and image 1 without boxes."""
    output = Path(output)
    datasets = datasets or {"toy": 12}
    models, methods = list(models), list(methods)
    real = [m for m in methods if m != "fakecam"] or methods
    failed = [(models[0], real[0], 2)] if failed is None else list(failed)
    constant = ([(models[0], "gradcam", 3)] if "gradcam" in methods else []) if constant is None else list(constant)
    started = started or datetime(2026, 1, 1, tzinfo=timezone.utc)
    samples_root = Path(samples_root) if samples_root else output / "_samples"
    path = output / f"run={run_id}"
    frames, samples = [], {}
    for dataset, n in datasets.items():
        samples[dataset] = make_samples(samples_root / dataset, dataset, n, seed=seed, split=split, no_box=no_box)
        frames.append(synthetic_rows(run_id, dataset, n, models, methods, seed=seed, split=split, no_box=no_box,
                                     failed=failed, constant=constant, steps=steps, iterations=iterations,
                                     maps=maps, created=started))
    rows = pd.concat(frames, ignore_index=True)
    if edit is not None:
        rows = edit(rows)
    write_rows(path, rows)
    meta = {}
    if manifest:
        meta = {
            "run_id": run_id,
            "config": {
                "run_id": run_id, "output": str(output),
                "datasets": [{"name": d, "uri": str(samples[d]), "limit": None} for d in datasets],
                "models": [{"name": m} for m in models],
                "methods": {m: ({"iterations": iterations} if m == "opticam" else {}) for m in methods},
                "metrics": ["classification", "insertion_deletion", "localization", "box_study"],
                "save_maps": "png" if maps else "none",
            },
            "started": started.isoformat(),
            "finished": (started + timedelta(minutes=5)).isoformat(),
            "rows": {"total": int(len(rows)), "failed": int(rows["error"].notna().sum())},
        }
        (path / "_run.json").write_text(json.dumps(meta, indent=1))
    return RunSpec(output=output, run_id=run_id, path=path, rows=rows, samples=samples, manifest=meta)
