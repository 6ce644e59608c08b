"""Localization metrics per image (SPEC §4): the terms of OM, LE, F1, BA, SP, EP and SM.

Boxes: pixel-edge coordinates of the preprocessed image (`opticam_core.boxes`); U is the union
mask of an image's ground-truth boxes (pixel-centre rule). Per image:

- loc_iou: B_p is the bounding box of the largest connected component of {S ≥ mean(S)};
  loc_iou = max over GT boxes of IoU(B_p, box). OM and LE come from it in `aggregate` (ILSVRC 0.5
  rule or raw IoU).
- box_iou: the same with {S > η} for η = 0, 0.01, …, 0.99 (B×100), for box accuracy.
- energy = Σ_U S / Σ S (energy pointing game, = F1's precision); recall = Σ_U S / |U|.
- pointing: a maximum of S lies in U; pointing_tol: within `tolerance` px (Euclidean, between
  pixel centres) of U, as in Zhang et al.'s pointing game. When several pixels share the maximum,
  `ties="any"` (default) counts a hit if any of them hits, like Quantus's PointingGame (which
  reproduces the paper's 99.8 for Fake-CAM); `ties="first"` uses the first in raster order
  (numpy's argmax, as TorchRay).
- sm = log(max(0.05, area(B_p)/(H·W))) − log p_c(crop): the image cropped to B_p and resized
  back to the input size (bilinear by default, `crop_mode`), p_c its probability of the target.

Components: 8-connectivity by default (cv2.findContours, as wsolevaluation), see `components`.
Comparisons are on the float32 map: ≥ at the mean (SPEC), strict > at the box-accuracy
thresholds η, as the paper (App. B.5) and wsolevaluation define BA: with ≥, η = 0 keeps the whole
image, and every method would score the whole-image box's accuracy (about 57 on ImageNet val).

Images without boxes (n_i = 0, or boxes too thin to cover a pixel centre): has_box False,
loc_iou / energy / recall NaN, box_iou NaN, pointing False (`aggregate` leaves them out by
has_box). sm does not need boxes and is computed for every image.

Flat maps (max S = min S, e.g. a constant map that became zeros) localize nothing: they get no
credit: loc_iou 0, box_iou 0, pointing False, energy 0, recall 0, sm NaN (no salient region to
crop; left out of SM). Otherwise every pixel would tie for the maximum and {S ≥ mean} would be
the whole image.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..boxes import best_iou, box_area, check_boxes, near_boxes
from ..cost import Cost
from ..fields import PerImage
from ..options import ListOf, NonNegativeFloat, PositiveInt, Probability
from ._forward import chunked_log_probs, resolve_batch_size
from .classification import check_batch
from .components import largest_component_boxes
from .registry import Metric, MetricBatch, register_group

THRESHOLDS = torch.arange(100, dtype=torch.float64) / 100  # η = 0, 0.01, …, 0.99 (Choe et al.)
TIES = ("any", "first")
CROP_MODES = ("bilinear", "bicubic", "nearest")
AREA_FLOOR = 0.05  # Dabkowski & Gal's floor on the area fraction


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Crop each image to its box (pixel-edge coordinates) and resample the crop to `size`, batched.

    Output pixel (i, j) samples the crop at x = x0 + (j + ½)·w/W_out (align_corners=False), with
    sample points kept within the crop's outer pixel centres: the result is that of cutting the
    crop out and then resizing it (F.interpolate), no pixel outside the crop bleeds in."""
    B, C, H, W = images.shape
    Ho, Wo = size
    x0, y0, x1, y1 = (v[:, None] for v in boxes.to(images.dtype).unbind(-1))
    j = torch.arange(Wo, device=images.device, dtype=images.dtype)
    i = torch.arange(Ho, device=images.device, dtype=images.dtype)
    x = torch.minimum(torch.maximum(x0 + (j + 0.5) * (x1 - x0) / Wo, x0 + 0.5), x1 - 0.5)  # B×Wo
    y = torch.minimum(torch.maximum(y0 + (i + 0.5) * (y1 - y0) / Ho, y0 + 0.5), y1 - 0.5)  # B×Ho
    grid = torch.stack([(2 * x / W - 1)[:, None, :].expand(B, Ho, Wo),
                        (2 * y / H - 1)[:, :, None].expand(B, Ho, Wo)], dim=-1)
    out = F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.clamp(0, 1) if mode == "bicubic" else out


@torch.no_grad()
def localization(maps: torch.Tensor, boxes, *, targets=None, bundle=None, images: torch.Tensor | None = None,
                 tolerance: NonNegativeFloat = 15, thresholds: ListOf(Probability) | None = None,
                 connectivity: Literal[4, 8] = 8, ties: Literal[TIES] = "any",
                 crop_mode: Literal[CROP_MODES] = "bilinear", batch_size: PositiveInt | None = None,
                 chunk_pixels: PositiveInt = 2 ** 26) -> dict[str, torch.Tensor]:
    """Per-image localization fields (names as in FIELDS) for maps S, B×H×W in [0,1].

    boxes: per-image n_i×4 boxes (list) or B×N×4 NaN-padded. sm needs `bundle`, `images` and
    `targets` (the class c); without them it is NaN. chunk_pixels bounds the thresholded masks
    held at once (images × thresholds × pixels).
    """
    home = maps.device
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3:
        raise ValueError(f"maps must be B×H×W, got shape {tuple(maps.shape)}")
    dev = bundle.device if bundle is not None else maps.device
    maps = maps.to(dev, torch.float32)
    B, H, W = maps.shape
    padded = check_boxes(boxes, B, device=dev)
    thresholds = (THRESHOLDS if thresholds is None else torch.as_tensor(thresholds, dtype=torch.float64)).to(dev)

    pixels = maps.flatten(1)
    constant = pixels.amax(1) == pixels.amin(1)
    U = near_boxes(padded, (H, W), 0.0)
    has_box = U.flatten(1).any(1)

    # Boxes of the largest component at the mean and at every η, chunked over images.
    T = len(thresholds) + 1
    per_chunk = max(1, chunk_pixels // (T * H * W))
    pred_boxes = torch.empty(B, T, 4, device=dev)
    for s in range(0, B, per_chunk):
        m = maps[s:s + per_chunk]
        at_mean = m >= pixels[s:s + per_chunk].mean(1)[:, None, None]
        above_eta = m[:, None] > thresholds.float()[None, :, None, None]  # strict: see the module docstring
        masks = torch.cat([at_mean[:, None], above_eta], dim=1)
        pred_boxes[s:s + per_chunk] = largest_component_boxes(masks.reshape(-1, H, W), connectivity)[0].view(-1, T, 4)
    iou = best_iou(pred_boxes, padded)  # B×T, NaN without boxes
    iou = torch.where(constant[:, None] & has_box[:, None], 0.0, iou)
    iou = torch.where(has_box[:, None], iou, float("nan"))

    # Pointing game: the maxima of S against U and against U grown by the tolerance.
    if ties == "any":
        peak = maps == pixels.amax(1)[:, None, None]
    else:
        peak = F.one_hot(pixels.argmax(1), H * W).bool().view(B, H, W)
    pointing = (peak & U).flatten(1).any(1) & ~constant
    near = near_boxes(padded, (H, W), float(tolerance)) if tolerance > 0 else U
    pointing_tol = (peak & near).flatten(1).any(1) & ~constant

    # Energy (= precision) and recall.
    S = maps.double()
    inside = (S * U).flatten(1).sum(1)
    total = S.flatten(1).sum(1)
    size_u = U.flatten(1).sum(1).double()
    energy = torch.where(total > 0, inside / torch.where(total > 0, total, 1.0), 0.0)
    recall = inside / size_u.clamp_min(1)
    energy = torch.where(has_box, torch.where(constant, 0.0, energy), float("nan"))
    recall = torch.where(has_box, torch.where(constant, 0.0, recall), float("nan"))

    # Saliency metric.
    sm = torch.full((B,), float("nan"), dtype=torch.float64, device=dev)
    if bundle is not None and images is not None and targets is not None:
        images, _, targets = check_batch(bundle, images, maps, targets)
        box = pred_boxes[:, 0]
        area = (box_area(box).double() / (H * W)).clamp_min(AREA_FLOOR)

        def build(part: slice):
            return crop_resize(images[part], box[part], (H, W), crop_mode), targets[part]

        bs = resolve_batch_size(batch_size, dev, model=bundle.model, example=images, copies=2, total=B)
        log_p = chunked_log_probs(bundle.model, B, build, bs, dev)
        sm = torch.where(constant, float("nan"), area.log() - log_p)

    out = {
        "has_box": has_box,
        "loc_iou": iou[:, 0].double(),
        "pointing": pointing & has_box,
        "pointing_tol": pointing_tol & has_box,
        "energy": energy,
        "recall": recall,
        "box_iou": iou[:, 1:].float(),
        "sm": sm,
    }
    return {k: v.to(home) for k, v in out.items()}


@register_group(
    "localization", needs_boxes=True, options_from=localization, skip=("targets", "bundle", "images"),
    cost=Cost(forwards=1, note="SM's crop"),
    fields=(PerImage("has_box", "bool", "the image has at least one ground-truth box of its class"),
            PerImage("loc_iou", "float64", "best IoU of the largest-component box at the mean threshold with a GT box"),
            PerImage("pointing", "bool", "a maximum of S inside the union of GT boxes (tolerance 0; ties: any maximum)"),
            PerImage("pointing_tol", "bool", "a maximum of S within `tolerance` px of the union of GT boxes"),
            PerImage("energy", "float64", "energy pointing game Σ_U S / Σ S (= F1's precision)"),
            PerImage("recall", "float64", "F1's recall Σ_U S / |U|"),
            PerImage("box_iou", "list<float32>", "best IoU of the largest component of {S > η}, η = 0, 0.01, …, 0.99"),
            PerImage("sm", "float64", "saliency metric log(max(0.05, area)) − log p_c(crop)")),
    metrics=(Metric("OM", "official metric", higher_is_better=False),
             Metric("LE", "localization error", higher_is_better=False),
             Metric("F1", "pixel-wise F1", higher_is_better=True),
             Metric("BA", "box accuracy", higher_is_better=True),
             Metric("SP", "standard pointing game", higher_is_better=True),
             Metric("EP", "energy pointing game", higher_is_better=True),
             Metric("SM", "saliency metric", higher_is_better=False, percent=False)))
def _localization(batch: MetricBatch, **options) -> dict[str, torch.Tensor]:
    return localization(batch.maps, batch.boxes, targets=batch.targets, bundle=batch.bundle, images=batch.images,
                        **options)
