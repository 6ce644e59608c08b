"""The actor: one frozen model; a batch of samples in, result rows out.

`Evaluator` is the callable class Ray Data runs in each actor (`map_batches(Evaluator, ...)`),
and the same code runs in-process (`Evaluator(...)(table)`), which the tests and the benchmark
use as the reference. It takes samples either raw (encoded `image`, original `boxes`: it decodes
and preprocesses them itself, boxes through the same resize/crop) or prepared by the job's CPU
decode stage (`pipeline.decode`: the same preprocessing, done before the actors), runs every
requested method in one `explain` call so they share passes (variants of one method in calls of
their own), computes every per-image metric with one clean forward
shared by all methods, and emits one row per (sample, method, target). Nothing is lost: a sample that cannot be decoded, or a method that fails on
it, yields rows with `error` set, and the rest of the batch goes on.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from opticam_core import explain, load_model
from opticam_core.methods import method_spec
from opticam_core.metrics import compute as compute_metrics
from opticam_core.metrics import group_options
from opticam_core.precision import check_precision, precision

from .config import TARGETS, method_base
from .decode import is_prepared, prepare_sample, short_error, short_text, unpack
from .schema import FIELDS, RESULTS, todo_entry

log = logging.getLogger(__name__)


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


class Evaluator:
    """Holds one frozen model on its device; `__call__(batch)` turns samples into result rows.

    run_id, dataset: identifiers stamped on rows. model: a `ModelSpec`-like mapping (name, key,
    weights, checkpoint, num_classes, layer). methods: key → options. metrics: group → options
    (each group gets only its own). Options are validated here too, before the model loads.
    A method key may be a variant `base:variant` (method `base` with its own options).
    targets: the classes maps are made for (`label`, `top1`, `top2`, `least`: the ground truth,
    or the most, second-most, least probable class on the clean image); the metrics always use
    the label. A batch may carry a `todo` column (comma-separated `pipeline.job.todo_entry`s:
    the (method, target) rows the job's resume left to compute per sample); without it every
    method runs for every target. precision, compile: how the network runs (`opticam_core.precision`,
    the run config's `compute.precision` and `compute.compile`), for every pass of a batch.
    """

    def __init__(self, *, run_id: str, dataset: str, model: Mapping, methods: Mapping[str, Mapping],
                 metrics: Mapping[str, Mapping], save_maps: str = "png", device: str | None = None,
                 threads: int | None = None, targets: Sequence[str] = ("label",),
                 preprocess: Mapping | None = None, precision: str = "fp32", compile: bool = False):
        check_precision(precision)  # before the model loads: a typo costs no weights
        self.precision, self.compile = precision, bool(compile)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads and device == "cpu":
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        self.run_id, self.dataset = run_id, dataset
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown or not targets:
            raise ValueError(f"targets: {unknown or 'none given'}; valid: {', '.join(TARGETS)}")
        self.targets = tuple(targets)
        self.bases = {k: method_base(k) for k in methods}
        specs = {k: method_spec(self.bases[k]) for k in methods}
        self.methods = {k: specs[k].kwargs(v) for k, v in methods.items()}
        self.options_json = {k: json.dumps(specs[k].resolved(v), sort_keys=True) for k, v in methods.items()}
        self.metric_options = group_options(metrics)
        self.model_key = model.get("key") or model["name"]
        self.normalized = bool(model.get("normalize", True))
        self.bundle = load_model(model["name"], weights=model.get("weights", "default"),
                                 checkpoint=model.get("checkpoint"), num_classes=model.get("num_classes"),
                                 layer=model.get("layer"), device=self.device, normalize=self.normalized)
        if preprocess:  # the dataset's geometry (`datasets[i].preprocess`): what the model was trained with
            from .preprocess import PreprocessSpec

            geometry = PreprocessSpec.model_validate(dict(preprocess)).kwargs()
            self.bundle.resize, self.bundle.input_size = geometry["resize"], tuple(geometry["size"])
        for spec in specs.values():  # a pair the config could not judge before the model existed
            spec.check_serves(self.bundle)
        self.num_classes = int(self.bundle.model(torch.zeros(1, 3, *self.bundle.input_size,
                                                             device=self.device)).shape[1])
        self.save_maps = save_maps == "png"

    # -- decoding ---------------------------------------------------------------------------

    def prepare(self, images: list[bytes], boxes: list) -> Prepared:
        """Raw samples (encoded bytes, original boxes), decoded here (`pipeline.decode.prepare_sample`)."""
        index, tensors, out_boxes, dropped, failed = [], [], [], [], {}
        size, resize = self.bundle.input_size, self.bundle.resize
        for i, (data, bxs) in enumerate(zip(images, boxes)):
            try:
                x, kept, n_dropped = prepare_sample(data, bxs, resize=resize, size=size)
            except Exception as err:  # one bad sample must not cost the batch
                failed[i] = short_error(err)
                continue
            index.append(i)
            tensors.append(x)
            out_boxes.append(kept)
            dropped.append(n_dropped)
        stacked = torch.stack(tensors).to(self.device) if tensors else None
        return Prepared(index, stacked, out_boxes, dropped, failed)

    def prepared(self, table: pa.Table) -> Prepared:
        """Samples the job's decode stage prepared (`pipeline.decode.decode_batch`)."""
        images, boxes, dropped, errors = unpack(table, self.bundle.input_size)
        failed = {i: short_text(e) for i, e in enumerate(errors) if e is not None}
        index = [i for i in range(len(images)) if i not in failed]
        # one copy out of the block's (read-only, shared) memory; numpy's stack is ~5× faster than
        # torch's on one thread (9 vs 48 ms for 32 images at 224×224)
        stacked = torch.from_numpy(np.stack([images[i].numpy() for i in index])).to(self.device) if index else None
        return Prepared(index, stacked, [boxes[i] for i in index], [int(dropped[i]) for i in index], failed)

    # -- methods and metrics ------------------------------------------------------------------

    def _explain(self, images, targets, methods: list[str]):
        """Shared calls, each holding at most one key per base method (`explain` takes one set of
        options per method, so variants of one method go to separate calls). Returns key →
        (Explanation | None, errors), in the order of `methods`."""
        rounds: list[list[str]] = []
        for key in methods:
            free = next((r for r in rounds if all(self.bases[k] != self.bases[key] for k in r)), None)
            if free is None:
                rounds.append([key])
            else:
                free.append(key)
        out = {}
        for keys in rounds:
            out.update(self._explain_shared(images, targets, keys))
        return {k: out[k] for k in methods}

    def _explain_shared(self, images, targets, methods: list[str]):
        """One shared call; on failure, each method alone, then each image alone, so that an
        error costs only the rows it belongs to."""
        bases = [self.bases[k] for k in methods]
        opts = {self.bases[k]: self.methods[k] for k in methods}
        try:
            res = explain(self.bundle, images, targets, bases, **opts)
            return {k: (res[b], {}) for k, b in zip(methods, bases)}
        except Exception as err:
            log.warning("%s × %s: explaining %d images with %s together failed (%s); retrying each method alone",
                        self.dataset, self.model_key, images.shape[0], ", ".join(methods), short_error(err))
        out = {}
        for key in methods:
            try:
                out[key] = (explain(self.bundle, images, targets, self.bases[key], **self.methods[key]), {})
            except Exception:
                out[key] = self._explain_each(images, targets, key)
        return out

    def _explain_each(self, images, targets, key):
        parts, errors = [], {}
        for j in range(images.shape[0]):
            try:
                parts.append(explain(self.bundle, images[j:j + 1], targets[j:j + 1], self.bases[key],
                                     **self.methods[key]))
            except Exception as err:
                parts.append(None)
                errors[j] = short_error(err)
        return _stack(key, parts, images), errors

    def __call__(self, batch: pa.Table | Mapping) -> pa.Table:
        table = batch if isinstance(batch, pa.Table) else pa.table(dict(batch))
        ids = table.column("sample_id").to_pylist()
        wanted = self._wanted(table)
        keep = [i for i, w in enumerate(wanted) if w]
        if not keep:
            return RESULTS.empty_table()
        cols = {name: table.column(name).to_pylist() for name in ("sample_id", "split", "label", "label_name")}
        sub = lambda xs: [xs[i] for i in keep]  # noqa: E731
        cols = {k: sub(v) for k, v in cols.items()}
        wanted = sub(wanted)
        if is_prepared(table):
            prep = self.prepared(table.take(keep))
        else:
            images = table.column("image").to_pylist()
            boxes = table.column("boxes").to_pylist() if "boxes" in table.column_names else [[] for _ in ids]
            prep = self.prepare(sub(images), sub(boxes))

        rows = _Rows(self, cols)
        for i, msg in prep.failed.items():
            for method, target in wanted[i]:
                rows.error(i, method, msg, target)
        labels = [cols["label"][i] for i in prep.index]
        bad_label = {j for j, lab in enumerate(labels) if lab is None or not 0 <= lab < self.num_classes}
        for j in sorted(bad_label):
            i = prep.index[j]
            for method, target in wanted[i]:
                rows.error(i, method, f"ValueError: label {labels[j]} outside the model's {self.num_classes} classes",
                           target)
        ok = [j for j in range(len(prep.index)) if j not in bad_label]
        if ok:
            self._evaluate(prep, ok, labels, wanted, rows)
        return rows.table()

    def _wanted(self, table: pa.Table) -> list[list[tuple[str, str]]]:
        """Per sample, the (method, target) rows to make."""
        every = [(m, t) for m in self.methods for t in self.targets]
        if "todo" not in table.column_names:
            return [every for _ in range(table.num_rows)]
        todo = [set((t or "").split(",")) for t in table.column("todo").to_pylist()]
        return [[(m, t) for m, t in every if todo_entry(m, t) in entries] for entries in todo]

    def _evaluate(self, prep: Prepared, ok: list[int], labels, wanted, rows: "_Rows") -> None:
        # Every network call of the batch (the clean forward, the methods, the metrics and their
        # re-runs) in the run's precision: the explain/compute calls inside inherit it.
        with precision(self.precision, self.bundle.model, compile=self.compile):
            self._evaluate_in_precision(prep, ok, labels, wanted, rows)

    def _evaluate_in_precision(self, prep: Prepared, ok: list[int], labels, wanted, rows: "_Rows") -> None:
        sel = torch.tensor(ok, device=self.device)
        images = prep.images.index_select(0, sel)
        targets = torch.tensor([labels[j] for j in ok], device=self.device, dtype=torch.long)
        boxes = [prep.boxes[j] for j in ok]
        positions = [prep.index[j] for j in ok]
        with torch.no_grad():
            clean = self.bundle.model(images)
        dropped = torch.tensor([prep.dropped[j] for j in ok])
        method_free: dict[str, torch.Tensor] = {}  # S:=B and S:=I∖B do not depend on the method
        for target in self.targets:
            methods = [m for m in self.methods if any((m, target) in wanted[i] for i in positions)]
            if methods:
                classes = target_classes(clean, targets, target)
                method_free = self._evaluate_target(images, targets, classes, target, methods, boxes, clean,
                                                    dropped, positions, wanted, rows, method_free)

    def _evaluate_target(self, images, targets, classes, target, methods, boxes, clean, dropped, positions,
                         wanted, rows: "_Rows", method_free):
        """The maps for `classes` (the target's class per image), the metrics on the label."""
        target_class = classes.tolist()
        for key, (expl, errors) in self._explain(images, classes, methods).items():
            try:
                metric_errors: dict[str, list[str | None]] = {}
                values = compute_metrics(self.bundle, images, targets, expl.maps, boxes, which=self.metric_options,
                                         clean_logits=clean, method_free=not method_free, method=self.bases[key],
                                         method_options=self.methods[key], map_targets=classes, errors=metric_errors)
                if "box_study" in self.metric_options:
                    method_free = method_free or {k: values[k] for k in ("o_box", "o_not_box")}
                    values.update(method_free)
            except Exception as err:
                values, errors, metric_errors = None, {j: short_error(err) for j in range(len(positions))}, {}
            per_image = _to_numpy({**(values or {}), **expl.extras, "boxes_dropped": dropped})
            maps = expl.maps.detach().float().cpu().numpy() if self.save_maps else None
            seconds = expl.seconds / len(positions)
            for j, i in enumerate(positions):
                if (key, target) not in wanted[i]:
                    continue
                if j in errors:
                    rows.error(i, key, errors[j], target, target_class[j])
                    continue
                failed = "; ".join(f"{group}: {short_text(msgs[j])}" for group, msgs in metric_errors.items() if msgs[j])
                rows.add(i, key, {k: v[j] for k, v in per_image.items()}, seconds,
                         encode_png(maps[j]) if maps is not None else None, metric_error=failed or None,
                         target=target, target_class=target_class[j])
        return method_free


def target_classes(logits: torch.Tensor, labels: torch.Tensor, target: str) -> torch.Tensor:
    """The class per image that a map for `target` explains: the label, or the most, second-most
    or least probable class on the clean image (paper Table A.9)."""
    if target == "label":
        return labels
    if target == "top1":
        return logits.argmax(1)
    if target == "top2":
        return logits.topk(2, dim=1).indices[:, 1]
    if target == "least":
        return logits.argmin(1)
    raise ValueError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")


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
    """The stored per-image values; extras declared in-memory only (e.g. extremal's masks) stay out."""
    return {k: v.detach().cpu().numpy() for k, v in values.items() if k in FIELDS}


class _Rows:
    """Accumulates result rows for one batch in the RESULTS schema."""

    def __init__(self, ev: Evaluator, cols: dict):
        self.ev, self.cols = ev, cols
        self.rows: list[dict] = []
        self.created = datetime.now(timezone.utc)

    def _base(self, i: int, method: str, target: str, target_class: int | None) -> dict:
        return {
            "run_id": self.ev.run_id, "dataset": self.ev.dataset, "split": self.cols["split"][i],
            "sample_id": self.cols["sample_id"][i], "model": self.ev.model_key,
            "layer": self.ev.bundle.layer_name, "method": method, "target": target,
            "label_name": self.cols["label_name"][i], "target_class": target_class,
            "normalized": self.ev.normalized,
            "label": self.cols["label"][i], "options": self.ev.options_json[method], "created": self.created,
        }

    def error(self, i: int, method: str, message: str, target: str = "label", target_class: int | None = None) -> None:
        self.rows.append({**self._base(i, method, target, target_class), "error": message})

    def add(self, i: int, method: str, values: dict, seconds: float, png: bytes | None,
            metric_error: str | None = None, *, target: str = "label", target_class: int | None = None) -> None:
        row = self._base(i, method, target, target_class)
        for name, value in values.items():
            kind = FIELDS[name].kind
            if kind == "list<float32>":
                row[name] = np.asarray(value, dtype=np.float32).tolist()
            elif kind == "bool":
                row[name] = bool(value)
            elif kind == "int64":
                row[name] = int(value)
            else:
                row[name] = float(value)
        row.update(seconds=seconds, map_png=png, metric_error=metric_error)
        self.rows.append(row)

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=RESULTS)
