"""The gradient CAMs. All five need only A and g = ∂y_c/∂A, which `Context.gradients()`
computes once per batch (one forward, one backward), so asking for several costs one pass.

Weights follow pytorch-grad-cam, the peer the paper's numbers came from (eps values included).
"""

from __future__ import annotations

import torch

from ..cost import Cost
from ..maps import finish
from ..options import PositiveFloat
from .base import Context
from .registry import register

#: One forward and one backward per image, shared by every gradient method of an `explain` call.
SHARED_GRADIENTS = Cost(shared={"gradients"})


def _weighted(weights: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """relu(Σ_k w_k A_k) for B×K weights and B×K×h×w features."""
    return torch.einsum("bk,bkhw->bhw", weights, feats).clamp_min(0)


def _done(ctx: Context, cams: torch.Tensor):
    maps, constant = finish(cams, ctx.size)
    return maps, {"constant": constant}


@register("gradcam", name="Grad-CAM", family="gradient", rank=10, cost=SHARED_GRADIENTS)
def gradcam(ctx: Context):
    """Grad-CAM: w_k = mean_ij g."""
    feats, grads = ctx.gradients()
    return _done(ctx, _weighted(grads.mean((2, 3)), feats))


@register("gradcampp", name="Grad-CAM++", family="gradient", rank=20, cost=SHARED_GRADIENTS)
def gradcampp(ctx: Context, *, eps: PositiveFloat = 1e-6):
    """Grad-CAM++: α = g²/(2g² + (Σ_ij A)·g³ + ε), α = 0 where g = 0; w_k = Σ_ij α·relu(g)."""
    feats, grads = ctx.gradients()
    g2 = grads.pow(2)
    g3 = g2 * grads
    alpha = g2 / (2 * g2 + feats.sum((2, 3), keepdim=True) * g3 + eps)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    return _done(ctx, _weighted((alpha * grads.clamp_min(0)).sum((2, 3)), feats))


@register("xgradcam", name="XGrad-CAM", family="gradient", rank=50, cost=SHARED_GRADIENTS)
def xgradcam(ctx: Context, *, eps: PositiveFloat = 1e-7):
    """XGrad-CAM: w_k = Σ_ij g·A / (Σ_ij A + ε)."""
    feats, grads = ctx.gradients()
    weights = (grads * feats).sum((2, 3)) / (feats.sum((2, 3)) + eps)
    return _done(ctx, _weighted(weights, feats))


@register("layercam", name="Layer-CAM", family="gradient", rank=60, cost=SHARED_GRADIENTS)
def layercam(ctx: Context):
    """Layer-CAM: S = relu(Σ_k relu(g_k) ⊙ A_k)."""
    feats, grads = ctx.gradients()
    return _done(ctx, (grads.clamp_min(0) * feats).sum(1).clamp_min(0))


@register("hirescam", name="HiRes-CAM", family="gradient", rank=80, cost=SHARED_GRADIENTS)
def hirescam(ctx: Context):
    """HiRes-CAM: S = relu(Σ_k g_k ⊙ A_k)."""
    feats, grads = ctx.gradients()
    return _done(ctx, (grads * feats).sum(1).clamp_min(0))
