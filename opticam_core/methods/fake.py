"""Fake-CAM: the paper's sanity baseline, a map that keeps the whole image."""

from __future__ import annotations

import torch

from ..cost import FREE
from ..maps import fake_cam
from .base import Context
from .registry import register


@register("fakecam", name="Fake-CAM", family="reference", rank=0, cost=FREE)
def fakecam(ctx: Context):
    """All ones except the top-left pixel: o ≈ p, so AD ≈ 0 by construction, not by insight."""
    B = ctx.images.shape[0]
    return fake_cam(B, ctx.size, device=ctx.device), {"constant": torch.zeros(B, dtype=torch.bool, device=ctx.device)}
