"""Saliency-map plumbing shared by every method: upsampling, normalisation, the constant-map rule.

Constant-map rule (SPEC §1): min–max normalisation of a constant map would divide by zero. Such a
map becomes all zeros (the method says nothing, so it gets no credit; pytorch-grad-cam and
TorchCAM give the same result), and `constant_maps` reports which images it hit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Below this range a map counts as constant. Relative to the map's magnitude, so that tiny
#: but genuine variations (e.g. logits-scale CAMs of a random network) are not zeroed.
CONSTANT_RTOL = 1e-6
CONSTANT_ATOL = 1e-12

NORMALIZATIONS = ("range", "max", "sigmoid")


def upsample(maps: torch.Tensor, size: tuple[int, int], *, align_corners: bool = False) -> torch.Tensor:
    """Bilinear upsampling of B×h×w or B×C×h×w maps to `size` (SPEC §1: align_corners=False)."""
    squeeze = maps.dim() == 3
    x = maps.unsqueeze(1) if squeeze else maps
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    return x.squeeze(1) if squeeze else x


def _flat_minmax(maps: torch.Tensor):
    flat = maps.flatten(start_dim=maps.dim() - 2)
    return flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]


def constant_maps(maps: torch.Tensor) -> torch.Tensor:
    """Bool per map (over the last two dims): True where the map has no range to normalise."""
    lo, hi = _flat_minmax(maps)
    span = (hi - lo)[..., 0, 0]
    scale = torch.maximum(hi.abs(), lo.abs())[..., 0, 0]
    return span <= CONSTANT_RTOL * scale + CONSTANT_ATOL


def normalize(maps: torch.Tensor, mode: str = "range") -> torch.Tensor:
    """Per-map normalisation to [0,1] over the last two dims; differentiable (Opti-CAM uses it).

    range: (S − min)/(max − min); max: S/max (after clamping negatives); sigmoid: σ(S).
    Constant maps become zeros under `range` and `max`.
    """
    if mode == "range":
        lo, hi = _flat_minmax(maps)
        span = hi - lo
        flat = constant_maps(maps)[..., None, None]
        return torch.where(flat, torch.zeros_like(maps), (maps - lo) / torch.where(flat, torch.ones_like(span), span))
    if mode == "max":
        pos = maps.clamp_min(0)
        _, hi = _flat_minmax(pos)
        flat = hi <= CONSTANT_ATOL
        return torch.where(flat, torch.zeros_like(pos), pos / torch.where(flat, torch.ones_like(hi), hi))
    if mode == "sigmoid":
        return torch.sigmoid(maps)
    raise ValueError(f"unknown normalization {mode!r}; valid: {', '.join(NORMALIZATIONS)}")


def finish(cams: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-resolution B×h×w CAMs → user maps B×H×W in [0,1], and the per-image constant flag.

    up then n (SPEC §1). Bilinear upsampling is linear with weights summing to one, so it commutes
    with any affine rescaling: n(up(n(S))) = n(up(S)), which is why pytorch-grad-cam's
    scale-resize-scale gives our maps. up(n(S)) alone is *not* n(up(S)): the upsampled samples
    need not hit the low-resolution extremes, so its range can be narrower than [0,1].
    """
    up = upsample(cams, size)
    return normalize(up), constant_maps(up)


def fake_cam(batch: int, size: tuple[int, int], device=None) -> torch.Tensor:
    """Fake-CAM: ones everywhere except the top-left pixel (the paper's sanity baseline)."""
    maps = torch.ones(batch, *size, device=device)
    maps[:, 0, 0] = 0
    return maps
