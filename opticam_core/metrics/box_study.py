"""The bounding-box study (the paper's Figure 4 / Table 5): AD/AG/AI of the map restricted to the
ground-truth boxes (B∩S), of the map outside them (S∖B), and of the method-free masks S := B and
S := I∖B. Per image only the probabilities o of the target class are stored; the terms come from
them and p in `aggregate`, like the classification metrics.
"""

from __future__ import annotations

import torch

from ..boxes import box_counts, check_boxes, union_mask
from ..cost import Cost
from ..fields import PerImage
from ..options import PositiveInt
from ._forward import chunked_log_probs, resolve_batch_size
from .classification import check_batch
from .registry import Metric, MetricBatch, register_group

#: The regions of the study: suffix of the aggregate metric → the o column it reads.
REGIONS = {"box_and_map": "o_box_and_map", "map_minus_box": "o_map_minus_box", "box": "o_box", "not_box": "o_not_box"}


@torch.no_grad()
def box_study(bundle, images: torch.Tensor, maps: torch.Tensor, boxes, targets, *,
              method_free: bool = True, batch_size: PositiveInt | None = None) -> dict[str, torch.Tensor]:
    """o of the target class under four masks built from M, the union mask of the GT boxes:
    S·M (B∩S), S·(1−M) (S∖B), M (S := B) and 1−M (S := I∖B). float64, NaN for images without
    boxes. AD/AG/AI of each come from these and p (see `aggregate`).

    method_free=False skips the last two, which do not depend on the map (a caller evaluating
    several methods on one batch needs them once)."""
    home = images.device
    images, maps, targets = check_batch(bundle, images, maps, targets)
    B, _, H, W = images.shape
    padded = check_boxes(boxes, B, device=images.device)
    M = union_mask(padded, (H, W)).float()
    masks = torch.stack([maps * M, maps * (1 - M), M, 1 - M][:4 if method_free else 2])  # k×B×H×W
    k = len(masks)
    bs = resolve_batch_size(batch_size, images.device, model=bundle.model, example=images, copies=2.5, total=k * B)

    def build(part: slice):
        k = torch.arange(part.start, part.stop, device=images.device)
        which, img = k // B, k % B
        return images[img] * masks[which, img][:, None], targets[img]

    o = chunked_log_probs(bundle.model, k * B, build, bs, images.device).exp().view(k, B)
    has = M.flatten(1).any(1) & (box_counts(padded) > 0)
    o = torch.where(has[None], o, float("nan"))
    return {name: o[i].to(home) for i, name in enumerate(list(REGIONS.values())[:k])}


_DOCS = {"box_and_map": "S·M (B∩S)", "map_minus_box": "S·(1−M) (S∖B)", "box": "S := M (method-free)",
         "not_box": "S := 1−M (method-free)"}


@register_group(
    "box_study", needs_boxes=True, options_from=box_study, skip=("method_free",),
    cost=Cost(forwards=2, once=2),  # S·M, S·(1−M) per method; S := M, 1−M once for all (`method_free`)
    fields=tuple(PerImage(col, "float64", f"o for {_DOCS[region]}") for region, col in REGIONS.items()),
    metrics=tuple(Metric(f"{m}@{region}", f"{name}, {_DOCS[region]}", higher_is_better=up)
                  for region in REGIONS
                  for m, name, up in (("AD", "average drop", False), ("AG", "average gain", True),
                                      ("AI", "average increase", True))))
def _box_study(batch: MetricBatch, **options) -> dict[str, torch.Tensor]:
    return box_study(batch.bundle, batch.images, batch.maps, batch.boxes, batch.targets,
                     method_free=batch.method_free, **options)
