"""The actor: one frozen model; a batch of samples in, result rows out.

`Evaluator` is the callable class Ray Data runs in each actor (`map_batches(Evaluator, ...)`),
and the same code runs in-process (`Evaluator(...)(table)`), which the tests and the benchmark
use as the reference. It decodes and preprocesses the samples (boxes go through the same
resize/crop), runs every requested method in one `explain` call so they share passes, computes
every per-image metric with one clean forward shared by all methods, and emits one row per
(sample, method). Nothing is lost: a sample that cannot be decoded, or a method that fails on
it, yields rows with `error` set, and the rest of the batch goes on.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from opticam_core import explain, load_model
from opticam_core.metrics import compute as compute_metrics
from opticam_core.metrics import preprocess, transform_boxes
from opticam_core.metrics.fields import FIELDS

from .schema import RESULTS

#: Allow huge but legitimate photos (ImageNet has 2400×1632; medical scans are larger); refuse
#: decompression bombs beyond this many pixels.
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000
_ERROR_LIMIT = 2000  # characters of an error message kept in a row


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded bytes → uint8 3×H×W. Grayscale, palette, alpha, CMYK and 16-bit files are
    converted to 8-bit RGB (16-bit by scaling 0–65535 to 0–255, not by clipping)."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, SyntaxError, ValueError) as err:  # PIL's ways of saying "not an image"
        raise ValueError(f"not a decodable image ({type(err).__name__}: {str(err).split(' <')[0]})") from None
    with img:
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            arr = np.asarray(img, dtype=np.float64)
            if not np.isfinite(arr).all():
                raise ValueError("image has non-finite pixel values")
            peak = float(arr.max()) if arr.size else 0.0
            top = 65535.0 if img.mode.startswith("I;16") or peak > 255 else 1.0 if img.mode == "F" and peak <= 1 else 255.0
            arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
            rgb = np.repeat(arr[..., None], 3, axis=2)
        else:
            rgb = np.array(img.convert("RGB"), dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"decoded image has shape {rgb.shape}")
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()


def encode_png(map_: np.ndarray) -> bytes:
    """A map in [0,1] → 8-bit grayscale PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.round(map_ * 255).astype(np.uint8), mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


@dataclass
class Prepared:
    """The samples of a batch that decoded, stacked; and the ones that did not, with why."""

    index: list[int]             # positions in the batch
    images: torch.Tensor | None  # B×3×H×W in [0,1]
    boxes: list[torch.Tensor]    # per image, m×4 in preprocessed pixels
    dropped: list[int]           # per image, boxes the crop left with no area
    failed: dict[int, str]       # position → error message


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return text[:_ERROR_LIMIT]


class Evaluator:
    """Holds one frozen model on its device; `__call__(batch)` turns samples into result rows.

    run_id, dataset: identifiers stamped on rows. model: a `ModelSpec`-like mapping (name, key,
    weights, checkpoint, num_classes, layer). methods: key → options. metrics: group → options.
    A batch may carry a `todo` column (comma-separated method keys: what the job's resume left
    to compute per sample); without it every method runs.
    """

    def __init__(self, *, run_id: str, dataset: str, model: Mapping, methods: Mapping[str, Mapping],
                 metrics: Mapping[str, Mapping], save_maps: str = "png", device: str | None = None,
                 threads: int | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads and device == "cpu":
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        self.run_id, self.dataset = run_id, dataset
        self.model_key = model.get("key") or model["name"]
        self.bundle = load_model(model["name"], weights=model.get("weights", "default"),
                                 checkpoint=model.get("checkpoint"), num_classes=model.get("num_classes"),
                                 layer=model.get("layer"), device=self.device)
        self.num_classes = int(self.bundle.model(torch.zeros(1, 3, *self.bundle.input_size,
                                                             device=self.device)).shape[1])
        self.methods = {k: dict(v or {}) for k, v in methods.items()}
        self.options_json = {k: json.dumps(v, sort_keys=True, default=list) for k, v in self.methods.items()}
        self.groups = tuple(metrics)
        merged: dict = {}
        for opts in metrics.values():
            merged.update(opts or {})
        self.metric_options = merged
        self.save_maps = save_maps == "png"

    # -- decoding ---------------------------------------------------------------------------

    def prepare(self, images: list[bytes], boxes: list) -> Prepared:
        index, tensors, out_boxes, dropped, failed = [], [], [], [], {}
        size, resize = self.bundle.input_size, self.bundle.resize
        for i, (data, bxs) in enumerate(zip(images, boxes)):
            try:
                if data is None or len(data) == 0:
                    raise ValueError("empty image bytes")
                raw = decode_image(data)
                x = preprocess(raw, resize=resize, size=size)
                if not torch.isfinite(x).all():
                    raise ValueError("image has non-finite pixel values")
                coords = [[b["x0"], b["y0"], b["x1"], b["y1"]] for b in (bxs or [])]
                if any(not np.isfinite(c).all() for c in coords):
                    raise ValueError("box with non-finite coordinates")
                kept, n_dropped = transform_boxes(coords, raw.shape[1], raw.shape[2], resize=resize, size=size)
            except Exception as err:  # one bad sample must not cost the batch
                failed[i] = _short(err)
                continue
            index.append(i)
            tensors.append(x)
            out_boxes.append(kept)
            dropped.append(n_dropped)
        stacked = torch.stack(tensors).to(self.device) if tensors else None
        return Prepared(index, stacked, out_boxes, dropped, failed)

    # -- methods and metrics ------------------------------------------------------------------

    def _explain(self, images, targets, methods: list[str]):
        """One shared call; on failure, each method alone, then each image alone, so that an
        error costs only the rows it belongs to. Returns key → (Explanation | None, errors)."""
        opts = {k: self.methods[k] for k in methods}
        try:
            res = explain(self.bundle, images, targets, methods, **opts)
            return {k: (res[k], {}) for k in methods}
        except Exception:
            pass
        out = {}
        for key in methods:
            try:
                out[key] = (explain(self.bundle, images, targets, key, **opts[key]), {})
            except Exception:
                out[key] = self._explain_each(images, targets, key)
        return out

    def _explain_each(self, images, targets, key):
        parts, errors = [], {}
        for j in range(images.shape[0]):
            try:
                parts.append(explain(self.bundle, images[j:j + 1], targets[j:j + 1], key, **self.methods[key]))
            except Exception as err:
                parts.append(None)
                errors[j] = _short(err)
        return _stack(key, parts, images), errors

    def __call__(self, batch: pa.Table | Mapping) -> pa.Table:
        table = batch if isinstance(batch, pa.Table) else pa.table(dict(batch))
        ids = table.column("sample_id").to_pylist()
        wanted = self._wanted(table)
        keep = [i for i, w in enumerate(wanted) if w]
        if not keep:
            return RESULTS.empty_table()
        cols = {name: table.column(name).to_pylist() for name in ("sample_id", "split", "label", "label_name")}
        images = table.column("image").to_pylist()
        boxes = table.column("boxes").to_pylist() if "boxes" in table.column_names else [[] for _ in ids]
        sub = lambda xs: [xs[i] for i in keep]  # noqa: E731
        cols = {k: sub(v) for k, v in cols.items()}
        wanted = sub(wanted)
        prep = self.prepare(sub(images), sub(boxes))

        rows = _Rows(self, cols)
        for i, msg in prep.failed.items():
            for method in wanted[i]:
                rows.error(i, method, msg)
        labels = [cols["label"][i] for i in prep.index]
        bad_label = {j for j, lab in enumerate(labels) if lab is None or not 0 <= lab < self.num_classes}
        for j in sorted(bad_label):
            i = prep.index[j]
            for method in wanted[i]:
                rows.error(i, method, f"ValueError: label {labels[j]} outside the model's {self.num_classes} classes")
        ok = [j for j in range(len(prep.index)) if j not in bad_label]
        if ok:
            self._evaluate(prep, ok, labels, wanted, rows)
        return rows.table()

    def _wanted(self, table: pa.Table) -> list[list[str]]:
        every = list(self.methods)
        if "todo" not in table.column_names:
            return [every for _ in range(table.num_rows)]
        todo = [set((t or "").split(",")) for t in table.column("todo").to_pylist()]
        return [[m for m in every if m in t] for t in todo]

    def _evaluate(self, prep: Prepared, ok: list[int], labels, wanted, rows: "_Rows") -> None:
        sel = torch.tensor(ok, device=self.device)
        images = prep.images.index_select(0, sel)
        targets = torch.tensor([labels[j] for j in ok], device=self.device, dtype=torch.long)
        boxes = [prep.boxes[j] for j in ok]
        positions = [prep.index[j] for j in ok]
        methods = [m for m in self.methods if any(m in wanted[i] for i in positions)]
        with torch.no_grad():
            clean = self.bundle.model(images)
        dropped = torch.tensor([prep.dropped[j] for j in ok])
        method_free: dict[str, torch.Tensor] = {}  # S:=B and S:=I∖B do not depend on the method
        for key, (expl, errors) in self._explain(images, targets, methods).items():
            try:
                values = compute_metrics(self.bundle, images, targets, expl.maps, boxes, which=self.groups,
                                         clean_logits=clean, method_free=not method_free, **self.metric_options)
                if "box_study" in self.groups:
                    method_free = method_free or {k: values[k] for k in ("o_box", "o_not_box")}
                    values.update(method_free)
            except Exception as err:
                values, errors = None, {j: _short(err) for j in range(len(ok))}
            per_image = _to_numpy({**(values or {}), **expl.extras, "boxes_dropped": dropped})
            maps = expl.maps.detach().float().cpu().numpy() if self.save_maps else None
            seconds = expl.seconds / len(ok)
            for j, i in enumerate(positions):
                if key not in wanted[i]:
                    continue
                if j in errors:
                    rows.error(i, key, errors[j])
                    continue
                rows.add(i, key, {k: v[j] for k, v in per_image.items()}, seconds,
                         encode_png(maps[j]) if maps is not None else None)


def _stack(key, parts, images):
    """Per-image Explanations (None where the method failed) → one batch Explanation."""
    from opticam_core.methods import Explanation

    good = [p for p in parts if p is not None]
    if not good:
        empty = torch.zeros(images.shape[0], *images.shape[-2:], device=images.device)
        return Explanation(key, empty, {}, 0.0)
    template = good[0]
    maps = torch.stack([p.maps[0] if p is not None else torch.zeros_like(template.maps[0]) for p in parts])
    extras = {}
    for name, value in template.extras.items():
        filler = torch.zeros_like(value[0]) if value.dtype == torch.bool else torch.full_like(value[0], float("nan")) \
            if value.is_floating_point() else torch.zeros_like(value[0])
        extras[name] = torch.stack([p.extras[name][0] if p is not None else filler for p in parts])
    return Explanation(key, maps, extras, sum(p.seconds for p in good))


def _to_numpy(values: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in values.items() if k in FIELDS}


class _Rows:
    """Accumulates result rows for one batch in the RESULTS schema."""

    def __init__(self, ev: Evaluator, cols: dict):
        self.ev, self.cols = ev, cols
        self.rows: list[dict] = []
        self.created = datetime.now(timezone.utc)

    def _base(self, i: int, method: str) -> dict:
        return {
            "run_id": self.ev.run_id, "dataset": self.ev.dataset, "split": self.cols["split"][i],
            "sample_id": self.cols["sample_id"][i], "model": self.ev.model_key,
            "layer": self.ev.bundle.layer_name, "method": method, "label_name": self.cols["label_name"][i],
            "label": self.cols["label"][i], "options": self.ev.options_json[method], "created": self.created,
        }

    def error(self, i: int, method: str, message: str) -> None:
        self.rows.append({**self._base(i, method), "error": message})

    def add(self, i: int, method: str, values: dict, seconds: float, png: bytes | None) -> None:
        row = self._base(i, method)
        for name, value in values.items():
            kind = FIELDS[name][0]
            if kind == "floats":
                row[name] = np.asarray(value, dtype=np.float32).tolist()
            elif kind == "bool":
                row[name] = bool(value)
            elif kind == "int":
                row[name] = int(value)
            else:
                row[name] = float(value)
        row.update(seconds=seconds, map_png=png)
        self.rows.append(row)

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=RESULTS)
