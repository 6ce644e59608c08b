"""GradientSHAP (Captum's `GradientShap`, the paper's SHAP representative), batched across images.

Per image x and class c, with n samples s = 1..n, each made of a baseline b_s drawn from a
distribution of baselines, Gaussian noise ε_s ~ N(0, stdevs²) per pixel and a point α_s ~ U[0, 1)
on the path:

    x̃_s = x + ε_s,    p_s = α_s·x̃_s + (1 − α_s)·b_s,    φ(x) = (1/n) Σ_s ∂y_c/∂x (p_s) ⊙ (x̃_s − b_s)

which is what Captum computes (`GradientShap` = `NoiseTunnel(smoothgrad)` around
`InputBaselineXGradient`; the noisy input, not the clean one, is multiplied, and it is not
clipped to [0, 1]). y_c is the target logit: the bundle's model returns logits, and Captum's
`target=c` selects that output. Attributions are with respect to **[0,1] pixels** (the bundle
normalises inside the model), so baselines live in pixel space too: "black" is a black photo,
not the normalised zero.

Where the draws come from (the one deliberate difference from Captum): Captum takes the baseline
indices and the α from numpy's global RNG and the noise from torch's, afresh for every
(image, sample). A method that consumed global RNGs would make a map depend on whatever ran
before it in the actor. Here the draws come from a CPU generator seeded by `seed` (so the same
seed gives the same draws on a CPU or a GPU) and are shared by every image of the batch: an
image's map is then the same whichever batch the job puts it in, and equals Captum's for that
image alone when Captum is handed the same draws (tests/test_gradshap.py replays Captum's
draws from its seeds).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..chunking import run_chunks
from ..cost import Cost
from ..maps import finish
from ..options import NonNegativeFloat, NonNegativeInt, PositiveInt
from .base import Context
from .registry import register

BASELINES = ("black", "mean", "uniform")
REDUCTIONS = ("abs_of_sum", "sum_of_abs", "positive", "sum")

#: (image, sample) pairs per forward/backward when no batch_size is given. On a CPU a pair of
#: Lite0 at 224² costs the same from 3 to 6 pairs and a fifth more at 8: the activations a
#: backward keeps outgrow the cache sooner than a forward's (Score-CAM's forwards take 8). On a
#: GPU, 64 is a guess, not yet measured: enough to fill the device, small enough for a backward.
CPU_CHUNK, GPU_CHUNK = 5, 64


def draw(shape: tuple[int, int, int], *, n_samples: int, baselines: str = "black", n_baselines: int = 10,
         stdevs: float = 0.0, seed: int = 0, mean: torch.Tensor | None = None,
         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The random part of GradientSHAP for images of `shape` (C×H×W), on the CPU.

    Returns the baseline of each sample (n×C×H×W), α (n) and the noise (n×C×H×W, None when
    stdevs is 0). `mean`: the model's normalisation mean (C), for baselines="mean".
    """
    gen = torch.Generator().manual_seed(seed)
    if baselines == "black":
        table = torch.zeros(1, *shape, dtype=dtype)
    elif baselines == "mean":
        if mean is None:
            raise ValueError("baselines='mean' needs the model's normalisation mean; this bundle's model has none")
        table = mean.detach().to("cpu", dtype).reshape(1, -1, 1, 1).expand(1, *shape).clone()
    elif baselines == "uniform":
        table = torch.rand(n_baselines, *shape, generator=gen, dtype=torch.float64).to(dtype)
    else:
        raise ValueError(f"unknown baselines {baselines!r}; valid: {', '.join(BASELINES)}")
    # Drawn with replacement, as Captum's np.random.choice over the baselines' distribution.
    index = torch.randint(len(table), (n_samples,), generator=gen)
    # float64 then cast, as Captum's np.random.uniform → input dtype.
    alpha = torch.rand(n_samples, generator=gen, dtype=torch.float64).to(dtype)
    noise = None
    if stdevs > 0:
        noise = (torch.randn(n_samples, *shape, generator=gen, dtype=torch.float64) * stdevs).to(dtype)
    return table[index], alpha, noise


def attributions(model, images: torch.Tensor, targets: torch.Tensor, base: torch.Tensor, alpha: torch.Tensor,
                 noise: torch.Tensor | None = None, *, chunk: int = CPU_CHUNK) -> torch.Tensor:
    """GradientSHAP attributions B×C×H×W of `model` (pixels → logits) for the target logits.

    Every image uses the same n samples: baselines `base` (n×C×H×W), path points `alpha` (n),
    noise (n×C×H×W or None). The B·n (image, sample) pairs run `chunk` at a time through one
    forward and one `autograd.grad` to the input each: no parameter gradient is ever formed.
    """
    B, n = images.shape[0], alpha.shape[0]
    device, dtype = images.device, images.dtype
    base, alpha = base.to(device, dtype), alpha.to(device, dtype)
    noise = noise.to(device, dtype) if noise is not None else None
    # Image-major, as Captum's repeat_interleave: pair r is image r // n, sample r % n.
    img = torch.arange(B, device=device).repeat_interleave(n)
    smp = torch.arange(n, device=device).repeat(B)
    total = torch.zeros_like(images)

    def pairs(start: int, stop: int) -> None:
        i, s = img[start:stop], smp[start:stop]
        x = images[i] if noise is None else images[i] + noise[s]
        b = base[s]
        a = alpha[s].view(-1, 1, 1, 1)
        # Captum's form of the point (not b + α(x − b)): the same rounding, so parity is tight.
        point = (a * x + (1.0 - a) * b).requires_grad_(True)
        with torch.enable_grad():
            score = model(point).gather(1, targets[i][:, None]).sum()
            (grad,) = torch.autograd.grad(score, point)
        # the last step, and in place: a range retried after an out-of-memory error added nothing
        total.index_add_(0, i, grad * (x - b))

    run_chunks(B * n, chunk, pairs, what="GradientSHAP")
    return total / n


def reduce(attr: torch.Tensor, reduction: str) -> torch.Tensor:
    """B×C×H×W attributions → B×H×W raw maps."""
    if reduction == "abs_of_sum":
        return attr.sum(1).abs()
    if reduction == "sum_of_abs":
        return attr.abs().sum(1)
    if reduction == "positive":
        return attr.sum(1).clamp_min(0)
    if reduction == "sum":
        return attr.sum(1)
    raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")


@register("gradshap", name="GradientSHAP", paper_name="GradSHAP", family="attribution", rank=95,
          cost=lambda o: Cost(forwards=o.n_samples, backwards=o.n_samples))
def gradshap(ctx: Context, *, n_samples: PositiveInt = 5, stdevs: NonNegativeFloat = 0.0,
             baselines: Literal["black", "mean", "uniform"] = "black", n_baselines: PositiveInt = 10,
             reduction: Literal["abs_of_sum", "sum_of_abs", "positive", "sum"] = "abs_of_sum",
             seed: NonNegativeInt = 0, batch_size: PositiveInt | None = None):
    """GradientSHAP (Captum `GradientShap`), reduced over channels, then min–max (constant → zeros).

    Cost: n_samples forwards and n_samples backwards to the input per image (5 + 5 by default);
    nothing else touches the network.

    n_samples, stdevs: Captum's defaults (5, 0.0; PAPER.md §2); the noise is per pixel, in [0,1]
    pixel units. baselines (the paper is silent, Captum has no default): "black", a black photo,
    the default: the usual "absence of signal" reference of path attributions, the same for every
    image and model, and the first half of Captum's tutorial distribution (input·0, input·1; the
    second half, the input itself, contributes exactly zero). "mean": the model's normalisation
    mean colour, i.e. the zero of the network's own input space, which is what that tutorial's
    input·0 is on normalised inputs. "uniform": `n_baselines` images of uniform pixel noise, a
    distribution as Captum recommends (more than one baseline). reduction (paper silent):
    "abs_of_sum" |Σ_c φ_c|, the default, as Captum's own `visualize_image_attr` draws
    attributions (channels summed, sign "absolute_value"); "sum_of_abs" Σ_c |φ_c|; "positive"
    max(Σ_c φ_c, 0) (Captum's sign "positive"); "sum" Σ_c φ_c (signed: min–max maps the most
    negative pixel to 0). seed: the draws (baselines, α, noise), shared by the batch's images.
    batch_size: (image, sample) pairs per forward/backward (default 5 on the CPU; on a GPU what
    its free memory holds, `opticam_core.chunking`).
    """
    mean = getattr(ctx.model, "mean", None)
    base, alpha, noise = draw(tuple(ctx.images.shape[1:]), n_samples=n_samples, baselines=baselines,
                              n_baselines=n_baselines, stdevs=stdevs, seed=seed,
                              mean=mean.flatten() if isinstance(mean, torch.Tensor) else None,
                              dtype=ctx.images.dtype)
    # per pair: the image, baseline, point, its gradient and x − b: five image-sized tensors
    chunk = ctx.chunk(CPU_CHUNK, GPU_CHUNK, batch_size, total=ctx.images.shape[0] * n_samples, copies=5, grad=True)
    attr = attributions(ctx.model, ctx.images, ctx.targets, base, alpha, noise, chunk=chunk)
    maps, constant = finish(reduce(attr, reduction), ctx.size)
    return maps, {"constant": constant}
