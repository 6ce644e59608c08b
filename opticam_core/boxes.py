"""Ground-truth boxes as tensors: the batched representation, their pixel masks, their IoU.

Convention (pixel-edge coordinates): a box is (x0, y0, x1, y1) in pixels of the preprocessed
image, with pixel (row i, column j) the unit square [j, j+1) × [i, i+1). A box covers a pixel when
it contains the pixel's centre (x0 ≤ j + ½ < x1, y0 ≤ i + ½ < y1); its area is (x1−x0)·(y1−y0).
So the box of pixels with columns c0…c1 and rows r0…r1 is (c0, r0, c1+1, r1+1). (An inclusive
1-based annotation such as ImageNet's xmin…xmax becomes (xmin−1, ymin−1, xmax, ymax).)

Batch: a B×N×4 float tensor, N the most boxes of any image, padded with NaN rows. `pad_boxes`
builds it from per-image n_i×4 tensors (n_i may be 0) and `unpad_boxes` goes back.
"""

from __future__ import annotations

from typing import Sequence

import torch


def pad_boxes(boxes, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Per-image boxes (a sequence of n_i×4 tensors, arrays or lists; n_i may be 0) → B×N×4.

    A tensor that is already B×N×4 passes through (moved to `device`).
    """
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() != 3 or boxes.shape[-1] != 4:
            raise ValueError(f"a box tensor must be B×N×4 (NaN rows pad), got shape {tuple(boxes.shape)}")
        return boxes.to(device=device if device is not None else boxes.device, dtype=dtype)
    rows = []
    for i, b in enumerate(boxes):
        t = torch.as_tensor(b, dtype=dtype).reshape(-1, 4) if b is not None else torch.zeros(0, 4, dtype=dtype)
        if t.numel() and not torch.isfinite(t).all():
            raise ValueError(f"image {i}: box coordinates must be finite, got {t.tolist()}")
        rows.append(t)
    n = max((len(t) for t in rows), default=0)
    out = torch.full((len(rows), n, 4), float("nan"), dtype=dtype)
    for i, t in enumerate(rows):
        out[i, :len(t)] = t
    return out.to(device) if device is not None else out


def unpad_boxes(padded: torch.Tensor) -> list[torch.Tensor]:
    """B×N×4 (NaN rows pad) → a list of n_i×4 tensors."""
    keep = box_valid(padded)
    return [padded[i][keep[i]] for i in range(padded.shape[0])]


def box_valid(padded: torch.Tensor) -> torch.Tensor:
    """B×N bool: the real (non-padding) boxes."""
    return ~torch.isnan(padded).any(-1)


def box_counts(padded: torch.Tensor) -> torch.Tensor:
    """B int64: boxes per image."""
    return box_valid(padded).sum(-1)


def pixel_ranges(padded: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The pixels a box covers by the centre rule: (c0, r0, c1, r1) inclusive, each B×N int64.

    Padding rows, and boxes too thin to hold a pixel centre, come out empty (c0 > c1 or r0 > r1).
    """
    b = torch.nan_to_num(padded, nan=0.0).double()
    c0 = torch.ceil(b[..., 0] - 0.5).long()
    r0 = torch.ceil(b[..., 1] - 0.5).long()
    c1 = torch.ceil(b[..., 2] - 0.5).long() - 1
    r1 = torch.ceil(b[..., 3] - 0.5).long() - 1
    empty = ~box_valid(padded)
    c1 = torch.where(empty, c0 - 1, c1)
    return c0, r0, c1, r1


def near_boxes(padded: torch.Tensor, size: tuple[int, int], tolerance: float = 0.0) -> torch.Tensor:
    """B×H×W bool: pixels whose centre is within `tolerance` pixels (Euclidean, between pixel
    centres) of a pixel covered by one of the image's boxes. tolerance 0 gives the union mask."""
    H, W = size
    dev = padded.device
    c0, r0, c1, r1 = pixel_ranges(padded)
    cols = torch.arange(W, device=dev)
    rows = torch.arange(H, device=dev)
    dx = (c0[..., None] - cols).clamp_min(0) + (cols - c1[..., None]).clamp_min(0)  # B×N×W
    dy = (r0[..., None] - rows).clamp_min(0) + (rows - r1[..., None]).clamp_min(0)  # B×N×H
    nonempty = (c0 <= c1) & (r0 <= r1)
    if tolerance <= 0:
        inside = (dy[..., :, None] == 0) & (dx[..., None, :] == 0)
    else:
        inside = (dy[..., :, None] ** 2 + dx[..., None, :] ** 2) <= tolerance ** 2
    return (inside & nonempty[..., None, None]).any(1)


def union_mask(padded: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """B×H×W bool: M, the union of each image's boxes (pixel-centre rule)."""
    return near_boxes(padded, size, 0.0)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp_min(0) * (boxes[..., 3] - boxes[..., 1]).clamp_min(0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes `a` (…×4) and `b` (…×4), broadcast; 0 where the union is empty."""
    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_min(0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_min(0)
    inter = w * h
    union = box_area(a) + box_area(b) - inter
    return torch.where(union > 0, inter / torch.where(union > 0, union, torch.ones_like(union)), torch.zeros_like(union))


def best_iou(pred: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
    """pred B×T×4 (T boxes per image, e.g. one per threshold), padded GT B×N×4 → B×T: the best
    IoU of each predicted box with any of its image's GT boxes (NaN where the image has none)."""
    iou = box_iou(pred[:, :, None, :], torch.nan_to_num(padded, nan=0.0)[:, None, :, :])  # B×T×N
    valid = box_valid(padded)[:, None, :]
    best = torch.where(valid, iou, torch.full_like(iou, -1.0)).amax(-1) if padded.shape[1] else \
        torch.full(pred.shape[:2], -1.0, device=pred.device, dtype=iou.dtype)
    return torch.where(best >= 0, best, torch.full_like(best, float("nan")))


def check_boxes(boxes, batch: int, *, device=None) -> torch.Tensor:
    """Any accepted box input (None, a list per image, a B×N×4 tensor) → validated B×N×4."""
    if boxes is None:
        return torch.zeros(batch, 0, 4, device=device)
    padded = pad_boxes(boxes, device=device)
    if padded.shape[0] != batch:
        raise ValueError(f"boxes for {padded.shape[0]} images, but {batch} images")
    return padded


__all__: Sequence[str] = ["pad_boxes", "unpad_boxes", "box_valid", "box_counts", "pixel_ranges", "near_boxes",
                          "union_mask", "box_area", "box_iou", "best_iou", "check_boxes"]
