"""Every per-image metric of one method's maps for one batch: the registered groups, each with
its own options."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..boxes import check_boxes
from ._forward import class_log_probs
from .classification import check_batch, clean_logits_of
from .registry import GROUPS, MetricBatch, group_options


@torch.no_grad()
def compute(bundle, images: torch.Tensor, targets, maps: torch.Tensor, boxes=None, *,
            which: Sequence[str] | Mapping[str, Mapping | None] | None = None,
            clean_logits: torch.Tensor | None = None, method_free: bool = True) -> dict[str, torch.Tensor]:
    """Per-image tensors (length B, or B×T for curves and box_iou) for maps S, named as the
    groups declare them (`opticam_core.fields.per_image_fields`).

    which: the metric groups, by name (their default options) or as a mapping group → options,
    e.g. `{"classification": {}, "insertion_deletion": {"steps": 56}}`; default every group.
    Always: label, pred, p (probability of the label on the clean image); then each group's
    fields (classification → o; insertion_deletion → insertion, deletion and their curves, class
    = pred; localization → has_box, loc_iou, pointing, pointing_tol, energy, recall, box_iou, sm;
    box_study → o_box_and_map, o_map_minus_box and, unless method_free=False (they do not depend
    on the map: one method per batch is enough), o_box, o_not_box).

    clean_logits: the clean images' logits, when the caller has them, so that one clean forward
    serves every method of a batch. boxes: per-image n_i×4 or B×N×4 NaN-padded, pixel-edge
    coordinates of the preprocessed image; None means no boxes. Tensors land on the images' device.
    """
    options = group_options(list(GROUPS) if which is None else which)
    home = images.device
    images, maps, targets = check_batch(bundle, images, maps, targets)
    B = images.shape[0]
    logits = clean_logits_of(bundle, images, clean_logits)
    needs_boxes = any(GROUPS[g].needs_boxes for g in options)
    batch = MetricBatch(bundle, images, targets, maps, check_boxes(boxes, B, device=images.device) if needs_boxes
                        else None, logits, method_free)
    out: dict[str, torch.Tensor] = {"label": targets, "pred": batch.pred, "p": class_log_probs(logits, targets).exp()}
    for key, opts in options.items():
        group = GROUPS[key]
        values = group.fn(batch, **opts)
        undeclared = sorted(set(values) - {f.name for f in group.fields})
        if undeclared:
            raise RuntimeError(f"metric group {key!r} emits undeclared fields {undeclared}")
        out.update(values)
    return {k: v.to(home) for k, v in out.items()}
