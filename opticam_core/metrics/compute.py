"""Every per-image metric of one method's maps for one batch: the registered groups, each with
its own options."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from typing import Any, Mapping, Sequence

import torch

from ..boxes import check_boxes
from ..precision import DEFAULT as DEFAULT_PRECISION
from ..precision import check_precision
from ..precision import precision as run_in
from ._forward import class_log_probs
from .classification import check_batch, clean_logits_of
from .registry import GROUPS, MetricBatch, default_groups, group_options
from .rerun import Rerun


@torch.no_grad()
def compute(bundle, images: torch.Tensor, targets, maps: torch.Tensor, boxes=None, *,
            which: Sequence[str] | Mapping[str, Mapping | None] | None = None,
            clean_logits: torch.Tensor | None = None, method_free: bool = True, method: str | None = None,
            method_options: Mapping[str, Any] | None = None, map_targets=None,
            errors: dict[str, list[str | None]] | None = None, precision: str = DEFAULT_PRECISION,
            compile: bool = False) -> dict[str, torch.Tensor]:
    """Per-image tensors (length B, or B×T for curves and box_iou) for maps S, named as the
    groups declare them (`opticam_core.fields.per_image_fields`).

    which: the metric groups, by name (their default options) or as a mapping group → options,
    e.g. `{"classification": {}, "insertion_deletion": {"steps": 56}}`; default every group that
    does not re-run the method (`default_groups()`).
    Always: label, pred, p (probability of the label on the clean image); then each group's
    fields (classification → o; insertion_deletion → insertion, deletion and their curves, class
    = pred; localization → has_box, loc_iou, pointing, pointing_tol, energy, recall, box_iou, sm;
    box_study → o_box_and_map, o_map_minus_box and, unless method_free=False (they do not depend
    on the map: one method per batch is enough), o_box, o_not_box).

    clean_logits: the clean images' logits, when the caller has them, so that one clean forward
    serves every method of a batch. method, method_options: the method (key and options) that
    made `maps`, needed by the groups that run it again (sensitivity, adcc, sanity); where it
    fails on an image, that image's values of the group are NaN and, when `errors` is a dict,
    `errors[group][j]` holds the reason (None where image j is fine). map_targets: the class each
    map was made for when it is not `targets` (maps for another class, Table A.9): re-runs use it,
    the metrics' class stays `targets`. boxes: per-image n_i×4 or B×N×4 NaN-padded, pixel-edge
    coordinates of the preprocessed image; None means no boxes. Tensors land on the images' device.
    precision, compile: how the network runs (`opticam_core.precision`; re-runs of the method
    inherit them); probabilities are computed from float32 logits in float64 whatever the precision.
    """
    check_precision(precision)
    with run_in(precision, bundle.model, compile=compile):
        return _compute(bundle, images, targets, maps, boxes, which, clean_logits, method_free, method,
                        method_options, map_targets, errors)


def _compute(bundle, images, targets, maps, boxes, which, clean_logits, method_free, method, method_options,
             map_targets, errors) -> dict[str, torch.Tensor]:
    options = group_options(default_groups() if which is None else which)
    home = images.device
    images, maps, targets = check_batch(bundle, images, maps, targets)
    B = images.shape[0]
    logits = clean_logits_of(bundle, images, clean_logits)
    needs_boxes = any(GROUPS[g].needs_boxes for g in options)
    calling = [g for g in options if GROUPS[g].calls_method]
    if calling and method is None:
        raise ValueError(f"metric group(s) {calling} run the method again: pass method= (and method_options=)")
    made_for = None if map_targets is None else torch.as_tensor(map_targets, device=images.device).long()
    if made_for is not None and made_for.shape != targets.shape:
        raise ValueError(f"map_targets: {tuple(made_for.shape)} for {B} images")
    batch = MetricBatch(bundle, images, targets, maps, check_boxes(boxes, B, device=images.device) if needs_boxes
                        else None, logits, method_free, map_targets=made_for)
    out: dict[str, torch.Tensor] = {"label": targets, "pred": batch.pred, "p": class_log_probs(logits, targets).exp()}
    for key, opts in options.items():
        group = GROUPS[key]
        rerun = Rerun(bundle, method, method_options) if group.calls_method else None
        with torch.enable_grad() if group.calls_method else nullcontext():  # methods need autograd
            values = group.fn(replace(batch, rerun=rerun) if rerun else batch, **opts)
        undeclared = sorted(set(values) - {f.name for f in group.fields})
        if undeclared:
            raise RuntimeError(f"metric group {key!r} emits undeclared fields {undeclared}")
        if rerun is not None and rerun.failures and errors is not None:
            errors[key] = _failed_images(values, rerun.failures[0], B)
        out.update(values)
    return {k: v.to(home) for k, v in out.items()}


def _failed_images(values: Mapping[str, torch.Tensor], message: str, n: int) -> list[str | None]:
    """Per image: `message` where one of the group's values is NaN (a failed re-run), else None."""
    bad = torch.zeros(n, dtype=torch.bool)
    for v in values.values():
        if v.is_floating_point() and v.shape[:1] == (n,):
            bad |= torch.isnan(v.reshape(n, -1)).any(1).cpu()
    return [message if b else None for b in bad.tolist()]
