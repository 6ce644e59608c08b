"""Opti-CAM (SPEC §3): per image, the softmax-weighted combination of feature maps that maximises
the target logit of the image masked by its own normalised, upsampled saliency map.

The whole batch is optimised at once. Adam is element-wise and each image's objective depends
only on its own weights (the network is in eval mode), so the batch gives every image exactly
the trajectory it would have alone. Early stopping is per image: a stopped image leaves the
active batch, which leaves the others' trajectories untouched.
"""

from __future__ import annotations

import math

import torch

from ..choices import check_choice
from ..maps import NORMALIZATIONS, constant_maps, normalize, upsample
from .base import Context, register

OBJECTIVES = ("mask", "diff")
SELECTIONS = ("best", "last")


def saliency(weights: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """S(x;u) = Σ_k softmax(u)_k A_k, B×h×w."""
    return torch.einsum("bk,bkhw->bhw", torch.softmax(weights, dim=1), feats)


def mask_of(weights, feats, size, normalization):
    return normalize(upsample(saliency(weights, feats), size), normalization)


def objective_of(model, images, targets, masks, objective, clean):
    logit = model(images * masks[:, None]).gather(1, targets[:, None])[:, 0]
    return logit if objective == "mask" else -(clean - logit).abs()


@register("opticam")
def opticam(
    ctx: Context,
    *,
    iterations: int = 100,
    lr: float = 0.1,
    objective: str = "mask",
    normalization: str = "range",
    early_stop: bool = False,
    check_every: int | None = None,
    activation: str | None = None,
    select: str = "best",
    init: float = 0.5,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
):
    """Optimise u ∈ R^{B×K} with Adam to maximise F(x;u) = f(x ⊙ n(up(S(x;u))))_c.

    objective: `mask` (the logit of the masked image, the paper's default) or `diff`
    (−|f(x)_c − f(x ⊙ s)_c|). normalization: `range` (min–max), `max`, `sigmoid`.
    early_stop: every `check_every` steps (default iterations/10) an image whose objective fell
    since its previous check stops (the official rule, applied per image instead of per batch).
    activation: None (A as the layer gives it: after ReLU for the paper's CNNs) or `relu`.
    select: `best` returns the best iterate seen (u_0 … u_T, one extra forward for u_T), so the
    objective never ends below its start; `last` returns u_T like the official code.
    Extras per image: iterations, objective (of the returned map), objective_start, early_stopped,
    objective_history (B×iterations, NaN after an early stop).
    """
    check_choice("objective", objective, OBJECTIVES)
    check_choice("normalization", normalization, NORMALIZATIONS)
    check_choice("select", select, SELECTIONS)
    check_choice("activation", activation, (None, "relu"))
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    check_every = check_every or max(1, iterations // 10)

    feats = ctx.features()
    if activation == "relu":
        feats = feats.clamp_min(0)
    B, K = feats.shape[:2]
    dev = feats.device
    model, size = ctx.model, ctx.size
    clean = ctx.logits().gather(1, ctx.targets[:, None])[:, 0] if objective == "diff" else None
    beta1, beta2 = betas

    # Full-batch results, written back as images stop.
    u = torch.full((B, K), float(init), device=dev, dtype=feats.dtype)
    best_u = u.clone()
    best_f = torch.full((B,), -math.inf, device=dev, dtype=feats.dtype)
    start_f = torch.empty(B, device=dev, dtype=feats.dtype)
    steps = torch.zeros(B, dtype=torch.long, device=dev)
    stopped = torch.zeros(B, dtype=torch.bool, device=dev)
    history = torch.full((B, iterations), math.nan, device=dev, dtype=feats.dtype)

    # The active batch, compacted.
    idx = torch.arange(B, device=dev)
    a_feats, a_images, a_targets = feats, ctx.images, ctx.targets
    a_clean = clean
    a_u, m, v = u.clone(), torch.zeros_like(u), torch.zeros_like(u)
    a_check = torch.full((B,), -math.inf, device=dev, dtype=feats.dtype)

    def keep(rows: torch.Tensor):
        nonlocal idx, a_feats, a_images, a_targets, a_clean, a_u, m, v, a_check
        idx, a_feats, a_images, a_targets = idx[rows], a_feats[rows], a_images[rows], a_targets[rows]
        a_u, m, v, a_check = a_u[rows], m[rows], v[rows], a_check[rows]
        if a_clean is not None:
            a_clean = a_clean[rows]

    def record(f: torch.Tensor, weights: torch.Tensor):
        better = f > best_f[idx]
        best_f[idx] = torch.where(better, f, best_f[idx])
        best_u[idx] = torch.where(better[:, None], weights, best_u[idx])

    with torch.enable_grad():
        for step in range(iterations):
            w = a_u.detach().requires_grad_(True)
            f = objective_of(model, a_images, a_targets, mask_of(w, a_feats, size, normalization), objective, a_clean)
            (grad,) = torch.autograd.grad(f.sum(), w)
            f = f.detach()
            if step == 0:
                start_f[idx] = f
                a_check = f.clone()
            record(f, a_u)
            history[idx, step] = f
            # Adam on the loss −F (torch.optim.Adam's update, written out so rows can leave).
            g = -grad
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bc1, bc2 = 1 - beta1 ** (step + 1), 1 - beta2 ** (step + 1)
            a_u = a_u - (lr / bc1) * m / (v.sqrt() / math.sqrt(bc2) + eps)
            steps[idx] += 1
            if early_stop and (step + 1) % check_every == 0 and step + 1 < iterations:
                # f belongs to the weights before this step; compare like with like.
                fell = f < a_check
                a_check = f.clone()
                if fell.any():
                    stopped[idx[fell]] = True
                    u[idx[fell]] = a_u[fell]
                    keep((~fell).nonzero()[:, 0])
                    if len(idx) == 0:
                        break
    u[idx] = a_u

    with torch.no_grad():
        if select == "best" and iterations > 0:
            # The final iterates have not been evaluated yet.
            f_last = objective_of(model, ctx.images, ctx.targets, mask_of(u, feats, size, normalization),
                                  objective, clean)
            better = f_last > best_f
            best_f = torch.where(better, f_last, best_f)
            chosen = torch.where(better[:, None], u, best_u)
        else:
            chosen = u
        up = upsample(saliency(chosen, feats), size)
        maps = normalize(up, normalization)
        if select == "last" or iterations == 0:
            best_f = objective_of(model, ctx.images, ctx.targets, maps, objective, clean)
            if iterations == 0:
                start_f = best_f.clone()
    extras = {
        "constant": constant_maps(up),
        "iterations": steps,
        "objective": best_f,
        "objective_start": start_f,
        "early_stopped": stopped,
        "objective_history": history,
    }
    return maps.clamp(0, 1), extras
