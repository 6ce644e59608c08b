"""Extremal perturbation (Fong, Patrick & Vedaldi, ICCV 2019) with TorchRay's defaults, a batch
of images and a list of areas optimised at once.

TorchRay's `extremal_perturbation` explains one image at a time. Here every (image, area) pair is
one row of a single optimisation: one forward and one backward per iteration serve them all. The
network is in eval mode, the energy is a sum of per-row terms and SGD is element-wise, so each
row follows the trajectory it would follow alone (up to floating-point reassociation).

The algorithm, as TorchRay runs it (its quirks kept on purpose, so results compare):
- Perturbation pyramid: L levels, level l = blur of the image with σ_l = max_blur·(1 − l/(L−1))
  (Gaussian, half-width ⌈4σ⌉, zero padding, so borders darken), or fade: x·l/(L−1). Level 0 is the
  most perturbed, level L−1 the image itself. A mask value m picks level m·(L−1), interpolating
  linearly between the two nearest levels.
- Smooth masks: a coarse parameter grid (one value per `step` pixels, initialised to ones) is
  spread by a radial kernel of width `sigma` and pooled with a softmax of coldness 20. The mask
  is generated with a margin of `sigma` pixels on each side; the image sees the central crop.
- Area regulariser on the *full* mask (margin included): −w·mean((sort(m) − r)²), r a step with
  round-down((1 − a)·N) zeros then ones. So `area` is a fraction of the margin-inclusive
  mask, which covers more pixels than the image: at 224×224, area 0.1 asks for about 13.5% of
  the image (`area_in_image` in the extras reports what the image got).
- Energy = reward + regulariser; SGD (lr 0.01, momentum 0.9, dampening 0.9: torch's rule, whose
  first step takes the raw gradient) ascends it; parameters are clamped to [0,1] after each step;
  w grows ×1.0035 per step; jitter flips the perturbed images horizontally on even iterations.
- The returned mask is the one generated at the last iteration (from the parameters before the
  last step), clamped to [0,1] and cropped to the image.

Speed: TorchRay's generator builds a rows×(2r+1)²×H'×W' tensor per operation (81×260×260 per
mask at 224×224), which on the CPU costs several times the network's forward and backward.
`SmoothMasks` computes the same pooling chunk by chunk with a closed-form backward (same
formula, other float rounding); `torchray_ops=True` runs TorchRay's operations instead and then
reproduces TorchRay's masks bit for bit. The optimisation amplifies rounding (its first mask is
full of exact ties, broken by rounding in the sort), so the two paths end at different masks of
the same quality, as TorchRay itself does when its kernel weights move by one ulp.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..choices import check_choice
from ..maps import constant_maps
from .base import Context, register

VARIANTS = ("preserve", "delete", "dual")
PERTURBATIONS = ("blur", "fade")
REWARDS = ("logit", "contrastive")

# TorchRay's float32 epsilon and √2 inside its Gaussian filter (kept for bit-level agreement).
_EPS32 = 1.19209290e-07


# --------------------------------------------------------------------------------------------
# The perturbation pyramid


def gaussian_blur(images: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, half-width ⌈4σ⌉, zero padding (TorchRay's `imsmooth`).

    The kernel is normalised to sum to one; with zero padding the borders therefore darken,
    as in TorchRay. σ = 0 gives the identity.
    """
    if float(sigma) < 0:
        raise ValueError(f"sigma must be >= 0, got {float(sigma)}")
    width = math.ceil(4 * sigma)
    sqrt2 = torch.tensor(math.sqrt(2), dtype=torch.float32)
    taps = torch.arange(-width, width + 1, dtype=torch.float32, device=images.device)
    taps = taps / (sqrt2.to(images.device) * sigma + _EPS32)
    kernel = torch.exp(-taps * taps)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    x = F.conv2d(images, kernel.reshape(1, 1, -1, 1).expand(channels, -1, -1, -1),
                 padding=(width, 0), groups=channels)
    return F.conv2d(x, kernel.reshape(1, 1, 1, -1).expand(channels, -1, -1, -1),
                    padding=(0, width), groups=channels)


def perturbation_pyramid(images: torch.Tensor, *, num_levels: int = 8, max_blur: float = 20.0,
                         kind: str = "blur") -> torch.Tensor:
    """B×L×C×H×W: level 0 most perturbed, level L−1 the images themselves."""
    check_choice("perturbation", kind, PERTURBATIONS)
    levels = []
    with torch.no_grad():
        # The level fractions in float32, as TorchRay computes them (σ and ⌈4σ⌉ depend on it).
        for frac in torch.linspace(0, 1, num_levels):
            if kind == "blur":
                levels.append(gaussian_blur(images, (1 - frac) * max_blur))
            else:
                levels.append(images * frac.to(images.device, images.dtype))
    return torch.stack(levels, dim=1)


def perturb(pyramid: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Images perturbed by masks: B×A×H×W masks in [0,1] over a B×L×C×H×W pyramid → B×A×C×H×W.

    Mask value m reads level m·(L−1), interpolating linearly between its two nearest levels
    (1 keeps the image, 0 takes the most perturbed level). Differentiable in the masks.
    """
    B, L, C, H, W = pyramid.shape
    A = masks.shape[1]
    pos = masks.unsqueeze(2) * (L - 1)                      # B×A×1×H×W
    lower = pos.floor()
    frac = pos - lower
    lower = lower.long().unsqueeze(2).expand(B, A, 1, C, H, W)
    levels = pyramid.unsqueeze(1).expand(B, A, L, C, H, W)
    below = torch.gather(levels, 2, lower).squeeze(2)
    above = torch.gather(levels, 2, (lower + 1).clamp(max=L - 1)).squeeze(2)
    return (1 - frac) * below + frac * above


# --------------------------------------------------------------------------------------------
# Smooth masks


#: Elements (rows × neighbours × pixels) per chunk of the mask generator. On the CPU a chunk
#: that stays in cache runs several times faster than one pass over the whole tensor; on a GPU
#: large chunks keep the kernels few while bounding memory.
CPU_CHUNK_ELEMENTS = 2**18
GPU_CHUNK_ELEMENTS = 2**27


class _SoftmaxPool(torch.autograd.Function):
    """Softmax pooling of the weighted neighbour values, chunked over pixels.

    q: N×M×K parameter values of the K neighbours of each of the M coarse cells (`F.unfold`,
    transposed); weight: P×K kernel weight of each neighbour at each of the P output pixels; cell:
    P, the cell each pixel reads (nearest upsampling). Output N×P: s = Σ_k x_k σ_k with
    x_k = w_k·q_k and σ = softmax(c·x). Neighbours lie last so that softmax and sum run over
    contiguous memory; the N×P×K tensor exists one chunk at a time, and the backward recomputes
    each chunk and applies ∂s/∂x_k = σ_k·(1 + c·(x_k − s)).
    """

    @staticmethod
    def forward(ctx, q, weight, cell, coldness, chunk):
        out = q.new_empty(q.shape[0], weight.shape[0])
        for a in range(0, weight.shape[0], chunk):
            x = weight[a:a + chunk] * q.index_select(1, cell[a:a + chunk])
            out[:, a:a + chunk] = (x * F.softmax(coldness * x, dim=2)).sum(dim=2)
        ctx.save_for_backward(q, weight, cell, out)
        ctx.coldness, ctx.chunk = coldness, chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        q, weight, cell, out = ctx.saved_tensors
        c, chunk = ctx.coldness, ctx.chunk
        dq = torch.zeros_like(q)
        for a in range(0, weight.shape[0], chunk):
            w, idx = weight[a:a + chunk], cell[a:a + chunk]
            cx = c * (w * q.index_select(1, idx))
            sigma = F.softmax(cx, dim=2)
            # c·x − (c·s − 1) = 1 + c·(x − s), in place of c·x, which the softmax no longer needs.
            dx = cx.sub_((c * out[:, a:a + chunk] - 1).unsqueeze(2)).mul_(sigma)
            dx.mul_(w).mul_(grad[:, a:a + chunk].unsqueeze(2))
            dq.index_add_(1, idx, dx)
        return dq, None, None, None, None


class SmoothMasks:
    """TorchRay's smooth mask generator for masks of `shape` (H, W).

    Parameters: N×1×h×w with (h, w) = `grid`, ⌈H/step⌉×⌈W/step⌉; parameter (i, j) is centred on
    image pixel (step·i, step·j). Output: the N×1×H×W masks seen by the image, and the N×1×H'×W'
    masks with their margin of `sigma` pixels (`full`), which the area regulariser ranks.

    Each pixel pools its (2r+1)² nearest parameters, weighted by a radial kernel, with a softmax
    of the given coldness. `reference` runs TorchRay's operations one for one (one N×(2r+1)²×H'×W'
    tensor per op); calling the object gives the same values from a chunked pooling that keeps
    that tensor out of memory (several times faster on the CPU; equal up to float rounding).
    """

    def __init__(self, shape: tuple[int, int], *, step: int = 7, sigma: float = 21.0,
                 coldness: float = 20.0, device=None, dtype=torch.float32):
        if int(step) != step or step < 1:
            raise ValueError(f"step must be a positive integer, got {step}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if not coldness > 0:
            raise ValueError(f"coldness must be > 0, got {coldness}")
        step = int(step)
        self.shape, self.step, self.sigma, self.coldness = tuple(shape), step, sigma, float(coldness)
        self.margin = sigma
        self.padding = 1 + math.ceil((self.margin + sigma) / step)
        self.radius = 1 + math.ceil(sigma / step)
        self.grid = [math.ceil(z / step) for z in self.shape]
        self.side = 2 * self.radius + 1
        self.mid = [z + 2 * self.padding - self.side + 1 for z in self.grid]
        self.up = [step * z for z in self.mid]
        self.full = [z - step + 1 for z in self.up]
        self.weight = self._weights().to(device=device, dtype=dtype)
        self.weight_t = self.weight.reshape(self.side ** 2, -1).t().contiguous()   # P×K
        self.cell = self._cells().to(device)

    def _weights(self) -> torch.Tensor:
        """1×K×H'×W': the kernel weight of each of the K = side² neighbouring parameters of every
        output pixel (computed in float32, as TorchRay does)."""
        f32 = torch.float32
        inv = [torch.tensor(m, dtype=f32) / torch.tensor(u, dtype=f32) for m, u in zip(self.mid, self.up)]
        uy = torch.arange(self.full[0], dtype=f32)[:, None]
        ux = torch.arange(self.full[1], dtype=f32)[None, :]
        offs = torch.arange(self.side, dtype=f32)
        # Parameter index of each neighbour (ky, kx), then its distance to the pixel.
        iy = torch.floor(inv[0] * uy)[None] + offs[:, None, None] - self.padding   # side×H'×1
        ix = torch.floor(inv[1] * ux)[None] + offs[:, None, None] - self.padding   # side×1×W'
        dy = (uy[None] - (self.margin + self.step * iy)) ** 2
        dx = (ux[None] - (self.margin + self.step * ix)) ** 2
        z = torch.sqrt(dy[:, None] + dx[None, :]) / self.sigma                      # side×side×H'×W'
        kernel = torch.exp(-2 * ((z - 0.5).clamp(min=0) ** 2))
        return kernel.reshape(1, self.side ** 2, *self.full)

    def _cells(self) -> torch.Tensor:
        """H'·W' long: the coarse cell each output pixel reads, as `F.interpolate(mode="nearest")`
        picks it when TorchRay upsamples the unfolded parameters."""
        def nearest(n_in, n_out):
            src = torch.arange(n_in, dtype=torch.float32).reshape(1, 1, n_in)
            return F.interpolate(src, size=n_out, mode="nearest").reshape(-1).long()
        ry = nearest(self.mid[0], self.up[0])[:self.full[0]]
        rx = nearest(self.mid[1], self.up[1])[:self.full[1]]
        return (ry[:, None] * self.mid[1] + rx[None, :]).reshape(-1)

    def _crop(self, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        full = full.clamp(0, 1)
        m = round(self.margin)
        return full[:, :, m:m + self.shape[0], m:m + self.shape[1]], full

    def __call__(self, params: torch.Tensor, *, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        q = F.unfold(params, (self.side, self.side), padding=(self.padding, self.padding))
        if chunk is None:
            budget = CPU_CHUNK_ELEMENTS if params.device.type == "cpu" else GPU_CHUNK_ELEMENTS
            chunk = max(1, budget // (len(params) * self.side ** 2))
        pooled = _SoftmaxPool.apply(q.transpose(1, 2).contiguous(), self.weight_t, self.cell, self.coldness, int(chunk))
        return self._crop(pooled.reshape(len(params), 1, *self.full))

    def reference(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TorchRay's `MaskGenerator.generate`, operation for operation."""
        x = F.unfold(params, (self.side, self.side), padding=(self.padding, self.padding))
        x = x.reshape(len(params), -1, *self.mid)
        x = F.interpolate(x, size=self.up, mode="nearest")
        x = x[..., :self.full[0], :self.full[1]]
        x = self.weight * x
        full = (x * F.softmax(self.coldness * x, dim=1)).sum(dim=1, keepdim=True)
        return self._crop(full)


# --------------------------------------------------------------------------------------------
# The method


def _rewards(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    score = logits.gather(1, targets[:, None])[:, 0]
    if kind == "contrastive":
        # TorchRay's contrastive reward: the target logit minus the best other one (the target
        # masked with −100).
        others = logits.scatter(1, targets[:, None], -100.0)
        score = score - others.amax(dim=1)
    return score


def _areas(areas) -> list[float]:
    if hasattr(areas, "tolist"):  # numpy or torch, scalar or array
        areas = areas.tolist()
    if isinstance(areas, (int, float)):
        areas = [areas]
    if not isinstance(areas, Sequence) or isinstance(areas, str):
        raise ValueError(f"areas must be a float or a list of floats in (0,1), got {areas!r}")
    areas = [float(a) for a in areas]
    if not areas:
        raise ValueError("areas must hold at least one area in (0,1), got an empty list")
    bad = [a for a in areas if not 0 < a < 1]
    if bad:
        raise ValueError(f"each area must lie strictly between 0 and 1, got {bad}")
    return areas


@register("extremal")
def extremal(
    ctx: Context,
    *,
    areas: float | Sequence[float] = (0.1,),
    iterations: int = 800,
    variant: str = "preserve",
    perturbation: str = "blur",
    num_levels: int = 8,
    max_blur: float = 20.0,
    step: int = 7,
    sigma: float = 21.0,
    coldness: float = 20.0,
    jitter: bool = True,
    lr: float = 0.01,
    momentum: float = 0.9,
    dampening: float | None = None,
    regul_weight: float = 300.0,
    regul_growth: float = 1.0035,
    reward: str = "logit",
    torchray_ops: bool = False,
):
    """Extremal perturbation masks of the given `areas` for class `ctx.targets`.

    variant: `preserve` (the mask keeps what raises the target logit), `delete` (the mask removes
    what lowers it), `dual` (both at once). perturbation: `blur` (pyramid of `num_levels` blurs
    up to σ = `max_blur`) or `fade` (towards black). step/sigma/coldness: the smooth mask
    generator. SGD: `lr`, `momentum`, `dampening` (default: = momentum, as TorchRay). Area
    regulariser: `regul_weight`, ×`regul_growth` per iteration. reward: `logit` (TorchRay's
    simple reward) or `contrastive` (target logit minus the best other logit). torchray_ops: run
    the mask generator with TorchRay's operations one for one, which reproduces TorchRay's masks
    bit for bit on the same device; the default pools in chunks, several times faster on the
    CPU, with the same formula but other float rounding. The optimisation starts from a mask full
    of exact ties and breaks them by rounding, so the two paths (like TorchRay on two devices)
    reach different masks of the same quality.

    Map: the mask for one area (not renormalised), the mean of the masks for several; a constant
    map becomes zeros (SPEC §1's rule). Extras per image: constant; iterations, objective,
    objective_start, objective_history (B×iterations): Opti-CAM's diagnostics, the objective
    being the reward (the target logit of the perturbed image for `preserve`) averaged over the
    areas. Per area (B×A, in the order given): reward (at the last iteration, the one that
    produced the mask), regul (the regulariser's term then), area (fraction of the
    margin-inclusive mask above 0.5: what the regulariser controls), area_in_image (the same on
    the image), reward_history and regul_history (B×A×iterations); masks (B×A×H×W) when
    several areas are asked.
    """
    check_choice("variant", variant, VARIANTS)
    check_choice("perturbation", perturbation, PERTURBATIONS)
    check_choice("reward", reward, REWARDS)
    area_list = _areas(areas)
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations}")
    if int(num_levels) != num_levels or num_levels < 2:
        raise ValueError(f"num_levels must be an integer >= 2, got {num_levels}")
    if perturbation == "blur" and not max_blur > 0:
        raise ValueError(f"max_blur must be > 0, got {max_blur}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0,1), got {momentum}")
    dampening = momentum if dampening is None else dampening
    if not 0 <= dampening <= 1:
        raise ValueError(f"dampening must be in [0,1], got {dampening}")
    if regul_weight < 0 or not regul_growth > 0:
        raise ValueError(f"regul_weight must be >= 0 and regul_growth > 0, got {regul_weight}, {regul_growth}")

    images, targets, model = ctx.images, ctx.targets, ctx.model
    B, A, T = images.shape[0], len(area_list), int(iterations)
    dev, dtype = images.device, images.dtype
    pyramid = perturbation_pyramid(images, num_levels=int(num_levels), max_blur=max_blur, kind=perturbation)
    gen = SmoothMasks(ctx.size, step=step, sigma=sigma, coldness=coldness, device=dev, dtype=dtype)
    rows = B * A
    row_targets = targets.repeat_interleave(A)
    if variant == "dual":
        row_targets = row_targets.repeat(2)

    # The area reference of each row: round-down((1 − a)·N) zeros, then ones (TorchRay's rule).
    n_full = gen.full[0] * gen.full[1]
    zeros = torch.tensor([int(n_full * (1 - a)) for a in area_list], device=dev).repeat(B)
    reference = (torch.arange(n_full, device=dev)[None] >= zeros[:, None]).to(dtype)

    params = torch.ones(rows, 1, *gen.grid, device=dev, dtype=dtype)
    velocity = None
    weight = float(regul_weight)
    reward_hist = torch.empty(rows, T, device=dev, dtype=dtype)
    regul_hist = torch.empty(rows, T, device=dev, dtype=dtype)

    with torch.enable_grad():
        for t in range(T):
            p = params.detach().requires_grad_(True)
            mask, full = gen.reference(p) if torchray_ops else gen(p)
            m = mask.reshape(B, A, *ctx.size)
            if variant == "preserve":
                x = perturb(pyramid, m)
            elif variant == "delete":
                x = perturb(pyramid, 1 - m)
            else:
                x = torch.stack((perturb(pyramid, m), perturb(pyramid, 1 - m)))
            x = x.reshape(-1, *images.shape[1:])
            if jitter and t % 2 == 0:
                x = torch.flip(x, dims=(3,))
            r = _rewards(model(x), row_targets, reward)
            if variant == "delete":
                r = -r
            elif variant == "dual":
                r = r[:rows] - r[rows:]
            ranked = full.reshape(rows, -1).sort(dim=1)[0]
            regul = -((ranked - reference) ** 2).mean(dim=1) * weight
            energy = (r + regul).sum()
            (grad,) = torch.autograd.grad(-energy, p)
            # torch.optim.SGD's momentum rule (the first step takes the raw gradient).
            if velocity is None:
                velocity = grad.clone()
            else:
                velocity.mul_(momentum).add_(grad, alpha=1 - dampening)
            params = params.add(velocity, alpha=-lr).clamp(0, 1)
            reward_hist[:, t] = r.detach()
            regul_hist[:, t] = regul.detach()
            weight *= regul_growth

    mask = mask.detach().reshape(B, A, *ctx.size)
    full = full.detach().reshape(B, A, -1)
    maps = mask[:, 0] if A == 1 else mask.mean(dim=1)
    constant = constant_maps(maps)
    maps = torch.where(constant[:, None, None], torch.zeros_like(maps), maps)
    reward_hist = reward_hist.reshape(B, A, T)
    extras = {
        "constant": constant,
        # The diagnostics Opti-CAM reports, with the reward (averaged over areas) as objective.
        "iterations": torch.full((B,), T, device=dev, dtype=torch.long),
        "objective": reward_hist[..., -1].mean(dim=1),
        "objective_start": reward_hist[..., 0].mean(dim=1),
        "objective_history": reward_hist.mean(dim=1),
        # Per area.
        "reward": reward_hist[..., -1],
        "regul": regul_hist[:, -1].reshape(B, A),
        "area": (full > 0.5).to(dtype).mean(dim=2),
        "area_in_image": (mask > 0.5).to(dtype).flatten(2).mean(dim=2),
        "reward_history": reward_hist,
        "regul_history": regul_hist.reshape(B, A, T),
    }
    if A > 1:
        extras["masks"] = mask
    return maps.clamp(0, 1), extras
