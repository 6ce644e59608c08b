"""Opti-CAM (SPEC §3): per image, the softmax-weighted combination of feature maps that maximises
the target logit of the image masked by its own normalised, upsampled saliency map.

The whole batch is optimised at once. Adam is element-wise and each image's objective depends
only on its own weights (the network is in eval mode), so the batch gives every image exactly
the trajectory it would have alone. Early stopping is per image: a stopped image leaves the
active batch, which leaves the others' trajectories untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Annotated, Literal

import annotated_types as at
import torch

from ..cost import Cost
from ..fields import PerImage
from ..maps import NORMALIZATIONS, constant_maps, normalize, upsample
from ..options import Bool, Float, NonNegativeInt, PositiveFloat, PositiveInt
from .base import Context
from .registry import register

#: The paper's objectives: `mask` (10, the default) and `diff` (19) of the main text, and the
#: in-out variants of App. F (F.1, F.2), which also score the image without its salient part.
OBJECTIVES = ("mask", "diff", "iomask", "iodiff")
_NEEDS_CLEAN = ("diff", "iodiff")
SELECTIONS = ("best", "last")
Beta = Annotated[Float, at.Ge(0), at.Lt(1)]

#: The diagnostics of an optimising method (extremal perturbation reports them too).
DIAGNOSTICS = (
    PerImage("iterations", "int64", "optimisation steps run"),
    PerImage("objective", "float64", "objective of the returned map"),
    PerImage("objective_start", "float64", "objective at the start"),
    PerImage("objective_history", "list<float32>", "objective at each step (NaN after an early stop)"),
)
EXTRAS = DIAGNOSTICS + (PerImage("early_stopped", "bool", "Opti-CAM: stopped early"),)


def saliency(weights: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """S(x;u) = Σ_k softmax(u)_k A_k, B×h×w."""
    return torch.einsum("bk,bkhw->bhw", torch.softmax(weights, dim=1), feats)


def mask_of(weights, feats, size, normalization):
    return normalize(upsample(saliency(weights, feats), size), normalization)


def objective_of(model, images, targets, masks, objective, clean):
    """F per image for masks s: g_c = the target logit.

    mask: g(x⊙s); diff: −|g(x) − g(x⊙s)|; iomask: g(x⊙s) − g(x⊙(1−s));
    iodiff: −|g(x) − g(x⊙s)| + |g(x) − g(x⊙(1−s))|. The in-out objectives score x⊙s and
    x⊙(1−s) in one forward of twice the batch. `clean`: g(x), for diff and iodiff.
    """
    inside = masks[:, None]
    if objective in ("iomask", "iodiff"):
        both = torch.cat([images * inside, images * (1 - inside)])
        logits = model(both).gather(1, targets.repeat(2)[:, None])[:, 0]
        kept, removed = logits.chunk(2)
        if objective == "iomask":
            return kept - removed
        return -(clean - kept).abs() + (clean - removed).abs()
    logit = model(images * inside).gather(1, targets[:, None])[:, 0]
    return logit if objective == "mask" else -(clean - logit).abs()


class CompactingAdam:
    """torch.optim.Adam's update, written out on B×K rows so that rows can leave the batch
    (`keep`) without changing the trajectory of the rows that stay. It ascends: `step` takes the
    gradient of the objective and moves against the gradient of the loss −F."""

    def __init__(self, u: torch.Tensor, *, lr: float, betas: tuple[float, float], eps: float):
        self.u = u
        self.m, self.v = torch.zeros_like(u), torch.zeros_like(u)
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.steps = 0

    def step(self, grad_objective: torch.Tensor) -> None:
        g = -grad_objective
        self.steps += 1
        self.m.mul_(self.beta1).add_(g, alpha=1 - self.beta1)
        self.v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        bc1, bc2 = 1 - self.beta1 ** self.steps, 1 - self.beta2 ** self.steps
        self.u = self.u - (self.lr / bc1) * self.m / (self.v.sqrt() / math.sqrt(bc2) + self.eps)

    def keep(self, rows: torch.Tensor) -> None:
        self.u, self.m, self.v = self.u[rows], self.m[rows], self.v[rows]


@dataclass
class _Trajectory:
    """What the optimisation leaves per image, for the whole batch (rows written back as images
    stop): the final and the best weights, the objective at the start, at its best and at each
    step, the steps run and whether the image stopped early."""

    u: torch.Tensor
    best_u: torch.Tensor
    best_f: torch.Tensor
    start_f: torch.Tensor
    steps: torch.Tensor
    stopped: torch.Tensor
    history: torch.Tensor

    @classmethod
    def start(cls, B: int, K: int, iterations: int, init: float, like: torch.Tensor) -> "_Trajectory":
        dev, dtype = like.device, like.dtype
        u = torch.full((B, K), float(init), device=dev, dtype=dtype)
        return cls(u=u, best_u=u.clone(), best_f=torch.full((B,), -math.inf, device=dev, dtype=dtype),
                   start_f=torch.empty(B, device=dev, dtype=dtype),
                   steps=torch.zeros(B, dtype=torch.long, device=dev),
                   stopped=torch.zeros(B, dtype=torch.bool, device=dev),
                   history=torch.full((B, iterations), math.nan, device=dev, dtype=dtype))

    def record(self, step: int, idx: torch.Tensor, f: torch.Tensor, u: torch.Tensor) -> None:
        """Objective f of weights u (rows idx) before step `step` is taken."""
        if step == 0:
            self.start_f[idx] = f
        better = f > self.best_f[idx]
        self.best_f[idx] = torch.where(better, f, self.best_f[idx])
        self.best_u[idx] = torch.where(better[:, None], u, self.best_u[idx])
        self.history[idx, step] = f

    def stop(self, idx: torch.Tensor, u: torch.Tensor) -> None:
        self.stopped[idx] = True
        self.u[idx] = u

    def record_final(self, f_last: torch.Tensor) -> None:
        """The objective of the final weights, which no step has evaluated yet."""
        better = f_last > self.best_f
        self.best_f = torch.where(better, f_last, self.best_f)
        self.best_u = torch.where(better[:, None], self.u, self.best_u)


@dataclass
class _Active:
    """The images still optimising, compacted: their batch positions and per-image tensors."""

    idx: torch.Tensor
    feats: torch.Tensor
    images: torch.Tensor
    targets: torch.Tensor
    clean: torch.Tensor | None
    check: torch.Tensor  # the objective at the last early-stop check

    def keep(self, rows: torch.Tensor) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(self, f.name, value[rows])


def _cost(options):
    # The in-out objectives score x⊙s and x⊙(1−s) in one forward of twice the batch; the last
    # evaluation (u_T for `best`, the returned map for `last`) is one more forward.
    k = 2 if options.objective in ("iomask", "iodiff") else 1
    return Cost(forwards=k * (options.iterations + 1), backwards=k * options.iterations, shared={"forward"},
                note="early_stop: at most this" if options.early_stop else "")


@register("opticam", name="Opti-CAM", family="optimisation", rank=100, extras=EXTRAS, cost=_cost)
def opticam(
    ctx: Context,
    *,
    iterations: NonNegativeInt = 100,
    lr: PositiveFloat = 0.1,
    objective: Literal[OBJECTIVES] = "mask",
    normalization: Literal[NORMALIZATIONS] = "range",
    early_stop: Bool = False,
    check_every: PositiveInt | None = None,
    activation: Literal["relu"] | None = None,
    select: Literal[SELECTIONS] = "best",
    init: Float = 0.5,
    betas: tuple[Beta, Beta] = (0.9, 0.999),
    eps: PositiveFloat = 1e-8,
):
    """Optimise u ∈ R^{B×K} with Adam to maximise F(x;u) = f(x ⊙ n(up(S(x;u))))_c.

    objective: `mask` (the logit of the masked image, the paper's default), `diff`
    (−|f(x)_c − f(x ⊙ s)_c|), or App. F's `iomask` (f(x ⊙ s)_c − f(x ⊙ (1−s))_c) and `iodiff`
    (−|f(x)_c − f(x ⊙ s)_c| + |f(x)_c − f(x ⊙ (1−s))_c|). normalization: `range` (min–max),
    `max`, `sigmoid`.
    early_stop: every `check_every` steps (default iterations/10) an image whose objective fell
    since its previous check stops (the official rule, applied per image instead of per batch).
    activation: None (A as the layer gives it: after ReLU for the paper's CNNs) or `relu`.
    select: `best` returns the best iterate seen (u_0 … u_T, one extra forward for u_T), so the
    objective never ends below its start; `last` returns u_T like the official code.
    Model evaluations per image: `iterations` forwards and backwards (+1 forward for `best`), the
    whole batch at once; twice that for `iomask`/`iodiff` (x⊙s and x⊙(1−s) in one forward).
    Extras per image: iterations, objective (of the returned map), objective_start, early_stopped,
    objective_history (B×iterations, NaN after an early stop).
    """
    check_every = check_every or max(1, iterations // 10)
    feats = ctx.features()
    if activation == "relu":
        feats = feats.clamp_min(0)
    B, K = feats.shape[:2]
    clean = ctx.logits().gather(1, ctx.targets[:, None])[:, 0] if objective in _NEEDS_CLEAN else None

    def evaluate(u, feats, images, targets, clean):
        return objective_of(ctx.model, images, targets, mask_of(u, feats, ctx.size, normalization), objective, clean)

    run = _Trajectory.start(B, K, iterations, init, feats)
    adam = CompactingAdam(run.u.clone(), lr=lr, betas=betas, eps=eps)
    active = _Active(idx=torch.arange(B, device=feats.device), feats=feats, images=ctx.images, targets=ctx.targets,
                     clean=clean, check=run.best_f.clone())
    with torch.enable_grad():
        for step in range(iterations):
            w = adam.u.detach().requires_grad_(True)
            f = evaluate(w, active.feats, active.images, active.targets, active.clean)
            (grad,) = torch.autograd.grad(f.sum(), w)
            f = f.detach()
            run.record(step, active.idx, f, adam.u)
            if step == 0:
                active.check = f.clone()
            adam.step(grad)
            run.steps[active.idx] += 1
            if early_stop and (step + 1) % check_every == 0 and step + 1 < iterations:
                # f belongs to the weights before this step; compare like with like.
                fell = f < active.check
                active.check = f.clone()
                if fell.any():
                    run.stop(active.idx[fell], adam.u[fell])
                    rows = (~fell).nonzero()[:, 0]
                    adam.keep(rows)
                    active.keep(rows)
                    if len(rows) == 0:
                        break
    run.u[active.idx] = adam.u

    with torch.no_grad():
        if select == "best" and iterations > 0:
            run.record_final(evaluate(run.u, feats, ctx.images, ctx.targets, clean))
            chosen = run.best_u
        else:
            chosen = run.u
        up = upsample(saliency(chosen, feats), ctx.size)
        maps = normalize(up, normalization)
        if select == "last" or iterations == 0:
            run.best_f = objective_of(ctx.model, ctx.images, ctx.targets, maps, objective, clean)
            if iterations == 0:
                run.start_f = run.best_f.clone()
    extras = {"constant": constant_maps(up), "iterations": run.steps, "objective": run.best_f,
              "objective_start": run.start_f, "early_stopped": run.stopped, "objective_history": run.history}
    return maps.clamp(0, 1), extras
