"""Every per-image metric of one method's maps for one batch, named as in FIELDS."""

from __future__ import annotations

from typing import Sequence

import torch

from ..boxes import check_boxes
from ._forward import class_log_probs
from .causal import RISE_BLUR, insertion_deletion
from .classification import box_study, check_batch, clean_logits_of
from .localization import localization

GROUPS = ("classification", "insertion_deletion", "localization", "box_study")


@torch.no_grad()
def compute(bundle, images: torch.Tensor, targets, maps: torch.Tensor, boxes=None, *,
            which: Sequence[str] = GROUPS, clean_logits: torch.Tensor | None = None,
            steps: int = 224, pixels_per_step: int | None = None, blur=RISE_BLUR,
            batch_size: int | None = None, tolerance: float = 15, thresholds=None,
            connectivity: int = 8, ties: str = "any", crop_mode: str = "bilinear",
            method_free: bool = True) -> dict[str, torch.Tensor]:
    """FIELDS-named per-image tensors (length B, or B×T for curves and box_iou) for maps S.

    Always: label, pred, p (probability of the label on the clean image). Then per group in
    `which`: classification → o; insertion_deletion → insertion, deletion, insertion_curve,
    deletion_curve (class = pred); localization → has_box, loc_iou, pointing, pointing_tol,
    energy, recall, box_iou, sm; box_study → o_box_and_map, o_map_minus_box, and, unless
    method_free=False (they do not depend on the map: one method per batch is enough), o_box, o_not_box.

    clean_logits: the clean images' logits, when the caller has them, so that one clean forward
    serves every method of a batch. boxes: per-image n_i×4 or B×N×4 NaN-padded, pixel-edge
    coordinates of the preprocessed image; None means no boxes. Tensors land on the images' device.
    """
    unknown = sorted(set(which) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown metric group(s) {unknown}; valid: {', '.join(GROUPS)}")
    home = images.device
    images, maps, targets = check_batch(bundle, images, maps, targets)
    B = images.shape[0]
    logits = clean_logits_of(bundle, images, clean_logits)
    pred = logits.argmax(1)
    out: dict[str, torch.Tensor] = {
        "label": targets,
        "pred": pred,
        "p": class_log_probs(logits, targets).exp(),
    }
    if "classification" in which:
        out["o"] = class_log_probs(bundle.model(images * maps[:, None]), targets).exp()
    if "insertion_deletion" in which:
        ins, dele, curves = insertion_deletion(bundle, images, maps, classes=pred, clean_logits=logits, steps=steps,
                                               pixels_per_step=pixels_per_step, blur=blur, batch_size=batch_size)
        out.update(insertion=ins, deletion=dele, insertion_curve=curves["insertion"].float(),
                   deletion_curve=curves["deletion"].float())
    needs_boxes = "localization" in which or "box_study" in which
    padded = check_boxes(boxes, B, device=images.device) if needs_boxes else None
    if "localization" in which:
        out.update(localization(maps, padded, targets=targets, bundle=bundle, images=images, tolerance=tolerance,
                                thresholds=thresholds, connectivity=connectivity, ties=ties, crop_mode=crop_mode,
                                batch_size=batch_size))
    if "box_study" in which:
        out.update(box_study(bundle, images, maps, padded, targets, method_free=method_free, batch_size=batch_size))
    return {k: v.to(home) for k, v in out.items()}
