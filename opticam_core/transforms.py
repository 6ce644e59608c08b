"""The preprocessing of the paper (Resize(256) then CenterCrop(224)), for images and their boxes.

The image and its boxes go through one geometry (`crop_geometry`), so a box stays on its object.
The geometry is torchvision's: the shorter side becomes `resize` and the longer one
int(resize · long / short); the crop's top-left corner is round((size − crop) / 2) with Python's
rounding. The image is resized with bilinear interpolation and antialiasing, like torchvision's
Resize on tensors (and close to PIL's, which the paper's loaders used).

Boxes follow the pixel-edge convention of `opticam_core.boxes`: scaled by the resize factors of
each axis, shifted by the crop corner, clipped to the crop. A box that the crop cuts keeps its
visible part; a box left with no width or height is dropped and counted.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .fields import PerImage

#: What preprocessing reports per image (the job stores it beside the metrics).
FIELDS = (PerImage("boxes_dropped", "int64", "ground-truth boxes that the resize/crop left with no area"),)


class CropGeometry(NamedTuple):
    """Where an image of `height`×`width` lands: resized to `resized` (h, w), then cropped at
    (`top`, `left`) to `size` (h, w)."""

    height: int
    width: int
    resized: tuple[int, int]
    top: int
    left: int
    size: tuple[int, int]


def crop_geometry(height: int, width: int, *, resize=256, size=(224, 224)) -> CropGeometry:
    """resize: an int sets the shorter side (aspect kept, torchvision's Resize(int)); a pair
    (h, w) resizes to exactly that (aspect not kept, Resize((h, w)): the medical models' direct
    resize to 224×224, PAPER.md App. E)."""
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}×{width}")
    if isinstance(resize, (tuple, list)):
        new_h, new_w = int(resize[0]), int(resize[1])
    else:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = int(resize), int(resize * long / short)
        new_h, new_w = (new_long, new_short) if width <= height else (new_short, new_long)
    if new_h < size[0] or new_w < size[1]:
        raise ValueError(f"resize {resize} gives {new_h}×{new_w}, smaller than the crop {size[0]}×{size[1]}")
    top = int(round((new_h - size[0]) / 2.0))
    left = int(round((new_w - size[1]) / 2.0))
    return CropGeometry(height, width, (new_h, new_w), top, left, size)


def preprocess(image: torch.Tensor, *, resize=256, size=(224, 224)) -> torch.Tensor:
    """A decoded image → float 3×h×w in [0,1] (h×w = `size`), ready for a `ModelBundle`.

    image: uint8 (0–255) or floating (0–1) tensor, C×H×W with C in {1, 2, 3, 4} (grayscale is
    repeated to three channels; an alpha channel is dropped) or H×W (grayscale).
    """
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a tensor, got {type(image).__name__}")
    x = image[None] if image.dim() == 2 else image
    if x.dim() != 3 or x.shape[0] not in (1, 2, 3, 4):
        raise ValueError(f"image must be C×H×W with 1–4 channels or H×W, got shape {tuple(image.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.is_floating_point():
        x = x.float()
    else:
        raise ValueError(f"image must be uint8 or floating, got {x.dtype}")
    x = x[:1].expand(3, -1, -1) if x.shape[0] <= 2 else x[:3]
    g = crop_geometry(x.shape[1], x.shape[2], resize=resize, size=size)
    if g.resized != (x.shape[1], x.shape[2]):
        x = F.interpolate(x[None], size=g.resized, mode="bilinear", align_corners=False, antialias=True)[0]
    x = x[:, g.top:g.top + g.size[0], g.left:g.left + g.size[1]]
    return x.clamp(0, 1).contiguous()


def transform_boxes(boxes, height: int, width: int, *, resize=256,
                    size=(224, 224)) -> tuple[torch.Tensor, int]:
    """Boxes n×4 (x0, y0, x1, y1) in original pixel-edge coordinates → (m×4 in the preprocessed
    image, the number of boxes dropped because nothing of them is left inside the crop).

    Boxes with x1 ≤ x0 or y1 ≤ y0 to start with are dropped and counted as well.
    """
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    g = crop_geometry(height, width, resize=resize, size=size)
    sx, sy = g.resized[1] / width, g.resized[0] / height
    scale = b.new_tensor([sx, sy, sx, sy])
    shift = b.new_tensor([g.left, g.top, g.left, g.top])
    hi = b.new_tensor([g.size[1], g.size[0], g.size[1], g.size[0]])
    out = torch.minimum((b * scale - shift).clamp_min(0), hi)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep], int((~keep).sum())


__all__ = ["CropGeometry", "crop_geometry", "preprocess", "transform_boxes"]
