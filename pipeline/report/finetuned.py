"""The fine-tuned medical models' test accuracy beside the paper's (App. E), for the captions of
the medical tables.

A run's manifest names each model's checkpoint; `opticam finetune` writes `metrics.json` beside
its `model.pt`. When that file is there, the caption gets the measured test accuracy and, for the
paper's four models, the published one: Chest X-ray VGG16 83.2 %, ResNet50 82.0 %; Kvasir
VGG16 89.5 %, ResNet50 89.8 %. A checkpoint without metrics.json (made elsewhere) gets no caption.
"""

from __future__ import annotations

import json
import posixpath
from typing import Callable, Mapping

from opticam_core.models import ALIASES

#: (dataset kind, architecture) → the paper's test accuracy in percent (PAPER.md, "Medical recipe").
PAPER_TEST_ACCURACY = {
    ("chestxray", "vgg16_bn"): 83.2, ("chestxray", "resnet50"): 82.0,
    ("kvasir", "vgg16_bn"): 89.5, ("kvasir", "resnet50"): 89.8,
}
_KIND_BY_CLASSES = {2: "chestxray", 8: "kvasir"}


def _kind(metrics: Mapping) -> str | None:
    """chestxray / kvasir from the training samples' dataset name, else from the class count."""
    name = str(metrics.get("dataset") or "").lower().replace("-", "").replace("_", "")
    for kind in ("chestxray", "kvasir"):
        if kind in name:
            return kind
    return _KIND_BY_CLASSES.get((metrics.get("model") or {}).get("num_classes"))


def metrics_uri(checkpoint: str) -> str:
    """metrics.json beside the checkpoint (local path or URI)."""
    head = checkpoint.rsplit("/", 1)[0] if "/" in checkpoint else "."
    return posixpath.join(head, "metrics.json") if "://" in checkpoint else f"{head}/metrics.json"


def _read_json(uri: str) -> dict | None:
    from pipeline import storage

    try:
        if not storage.exists(uri):
            return None
        return json.loads(storage.read_text(uri))
    except (OSError, ValueError):
        return None


def accuracy_caption(model_key: str, model_name: str, metrics: Mapping) -> str | None:
    acc = metrics.get("test_accuracy")
    if not isinstance(acc, (int, float)):
        return None
    arch = ALIASES.get(model_name, model_name)
    paper = PAPER_TEST_ACCURACY.get((_kind(metrics), arch))
    beside = f" (paper: {paper:.1f} %)" if paper is not None else ""
    return f"{model_key}: fine-tuned, test accuracy {100 * acc:.1f} %{beside}."


def finetuned_captions(manifest: Mapping, read: Callable[[str], dict | None] = _read_json) -> dict[str, str]:
    """model key → caption line, for each model of the run's manifest whose checkpoint has a
    metrics.json beside it (read: how to read one, a URI → dict or None)."""
    config = manifest.get("config") or manifest
    out = {}
    for m in config.get("models") or []:
        checkpoint = m.get("checkpoint")
        if not isinstance(checkpoint, str) or not checkpoint:
            continue
        metrics = read(metrics_uri(checkpoint))
        if not metrics:
            continue
        key = m.get("key") or m.get("name")
        caption = accuracy_caption(key, m.get("name", ""), metrics)
        if caption:
            out[key] = caption
            for layer in m.get("layers") or []:  # `layers` expands into `{key}@{layer}` models
                out[f"{key}@{layer}"] = caption
    return out
