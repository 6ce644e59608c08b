"""AOPC (Samek et al. 2016) as the paper ran it: Quantus 0.6 `RegionPerturbation`, batched.

Quantus (patch_size 14, regions_evaluation 10, order "morf", its defaults otherwise) does, per
image x with map S and class c (the label passed to it):

- the input is cut into non-overlapping patch×patch squares (raster order), each ranked by the sum
  of S over it (Quantus first divides S by max|S| of the whole batch, which keeps the ranking);
  MoRF = largest sum first, LeRF = smallest first;
- x⁽ᵏ⁾ is x with the first k patches replaced, in every channel, by the baseline. Quantus's
  "black" is not 0 but the minimum of the array being perturbed, over all channels and pixels:
  min(x), as a patch set to the minimum leaves it unchanged ("white": max(x)). "mean" is the mean
  of x⁽ᵏ⁻¹⁾, so it changes from step to step as patches are replaced by earlier means; a number is
  used as it is. All in the space the model takes (here [0,1] pixels: the bundle normalises inside);
- the returned curve holds f_c(x) − f_c(x⁽ᵏ⁾) for k = 1 … L, L = min(regions, patches), with f
  the softmax probability (Quantus's `softmax=True` default) or the logit.

AOPC (Samek's definition, PAPER.md §2) = 1/(L+1) · Σ_{k=0..L} [f_c(x) − f_c(x⁽ᵏ⁾)], the k = 0
term being 0: the curve's sum over L + 1. (Quantus's own `get_auc_score`, a trapezoid over the
curve with dx = 1, is about L − 1 times the curve's mean: not the scale of the paper's values.)

Where we differ from Quantus: it pads the input when the patch size does not divide it; we refuse
such a size (`check_input_size`) rather than invent border patches. Ties between patch sums are
broken by raster order (a stable sort), where Quantus's numpy quicksort breaks them arbitrarily
(only exactly tied patches, e.g. all-zero ones, can be ordered differently). Probabilities are float64 log-softmax of the float32 logits (Quantus:
float32 softmax), so the two agree to float32 precision.

Cost: L forwards per image (the clean score comes from the clean logits compute already has), all
B·L step images through the network together, `batch_size` at a time, on the images' device.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Mapping, Sequence

import torch
from pydantic import BeforeValidator

from ..chunking import run_chunks
from ..cost import Cost
from ..fields import PerImage
from ..options import Bool, OptionsError, PositiveInt
from ._forward import class_log_probs, resolve_batch_size
from .classification import check_batch, clean_logits_of
from .registry import GROUPS, Metric, MetricBatch, register_group

BASELINES = ("black", "white", "mean")
WHERE = "metrics.aopc"


def _baseline(value):
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, str) and value in BASELINES:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ValueError("Input should be 'black', 'white', 'mean' or a finite number")


#: One rule for the baseline, so that a bad value gets one message, not one per branch of a union.
Baseline = Annotated[Literal["black", "white", "mean"] | float, BeforeValidator(_baseline)]


def _size_problem(patch_size: int, size: Sequence[int]) -> str | None:
    H, W = (int(s) for s in size)
    if H % patch_size or W % patch_size:
        fits = [d for d in range(1, min(H, W) + 1) if H % d == 0 and W % d == 0]
        return (f"{patch_size} does not divide the input size {H}×{W} into whole patches; "
                f"sizes that do: {', '.join(map(str, fits))}")
    return None


def check_input_size(options: Mapping | None, size: Sequence[int]) -> None:
    """Raise OptionsError (naming `metrics.aopc.patch_size`) when the aopc group's options
    (raw or validated; None = defaults) cannot run on inputs of `size` = (H, W)."""
    patch = GROUPS["aopc"].kwargs(options)["patch_size"]
    problem = _size_problem(patch, size)
    if problem:
        raise OptionsError([f"{WHERE}.patch_size: {problem}"])


def _baseline_values(images: torch.Tensor, patch_sums: torch.Tensor, order: torch.Tensor, L: int,
                     baseline, patch_elements: int) -> torch.Tensor:
    """B×L float64: the value written into the patch replaced at step j (j = 0 … L−1)."""
    flat = images.flatten(1).double()
    B = flat.shape[0]
    if baseline == "black":
        return flat.min(1).values[:, None].expand(B, L)
    if baseline == "white":
        return flat.max(1).values[:, None].expand(B, L)
    if baseline == "mean":
        # mean of x⁽ʲ⁾: patches are disjoint, so x⁽ʲ⁾'s sum is x's minus the replaced patches' own
        # sums plus what was written into them.
        total, N = flat.sum(1), flat.shape[1]
        removed = patch_sums.gather(1, order[:, :L])
        out = torch.empty(B, L, dtype=torch.float64, device=flat.device)
        for j in range(L):
            out[:, j] = total / N
            total = total - removed[:, j] + patch_elements * out[:, j]
        return out
    return torch.full((B, L), float(baseline), dtype=torch.float64, device=flat.device)


@torch.no_grad()
def region_perturbation(bundle, images: torch.Tensor, maps: torch.Tensor, targets, *,
                        clean_logits: torch.Tensor | None = None, patch_size: PositiveInt = 14,
                        regions: PositiveInt = 10, order: Literal["morf", "lerf"] = "morf",
                        baseline: Baseline = "black", softmax: Bool = True,
                        batch_size: PositiveInt | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(aopc B float64, curve B×L float64) of maps S (B×H×W) for class `targets` (the label, as
    Quantus uses the label it is given); see the module docstring for every rule.

    patch_size: side of the square patches (must divide H and W). regions: L, the patches removed
    (capped at the number of patches). order: "morf" (most relevant first) or "lerf". baseline:
    "black" (min of x), "white" (max of x), "mean" (mean of the current image) or a number.
    softmax: probabilities (True) or logits. batch_size: step images per forward (default 8 on a
    CPU; on a GPU what its free memory holds, `opticam_core.chunking`)."""
    home = images.device
    problem = _size_problem(patch_size, images.shape[-2:])
    if problem:
        raise OptionsError([f"{WHERE}.patch_size: {problem}"])
    images, maps, targets = check_batch(bundle, images, maps, targets)
    dev = images.device
    B, C, H, W = images.shape
    nh, nw = H // patch_size, W // patch_size
    P = nh * nw
    L = min(regions, P)

    def patch_sum(t: torch.Tensor) -> torch.Tensor:  # B×(C×)H×W → B×P, raster order of patches
        return t.double().reshape(B, -1, nh, patch_size, nw, patch_size).sum((1, 3, 5)).reshape(B, P)

    ranking = torch.argsort(patch_sum(maps), dim=1, descending=order == "morf", stable=True)
    rank = torch.empty_like(ranking)
    rank.scatter_(1, ranking, torch.arange(P, device=dev).expand(B, P))
    values = _baseline_values(images, patch_sum(images) if baseline == "mean" else None, ranking, L,
                              baseline, C * patch_size * patch_size)

    # the value each patch receives when its turn comes (patches that never do: unused)
    fill = values.gather(1, rank.clamp_max(L - 1)).to(images.dtype)

    def to_pixels(t: torch.Tensor) -> torch.Tensor:  # n×P per patch → n×H×W
        n = t.shape[0]
        return t.view(n, nh, 1, nw, 1).expand(n, nh, patch_size, nw, patch_size).reshape(n, H, W)

    def score(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        if softmax:
            return class_log_probs(logits, classes).exp()
        return logits.double().gather(1, classes[:, None])[:, 0]

    clean = score(clean_logits_of(bundle, images, clean_logits), targets)
    total = B * L
    steps = torch.empty(total, dtype=torch.float64, device=dev)

    def perturbed(start: int, stop: int) -> None:
        job = torch.arange(start, stop, device=dev)
        b, k = job // L, job % L + 1  # image, patches replaced
        hit = rank[b] < k[:, None]  # n×P: patches replaced after k steps
        x = torch.where(to_pixels(hit)[:, None], to_pixels(fill[b])[:, None], images[b])
        steps[start:stop] = score(bundle.model(x), targets[b])

    # per step image: the gathered image, the fill and mask (as pixels), the composite
    bs = resolve_batch_size(batch_size, dev, model=bundle.model, example=images, copies=3.5, total=total)
    run_chunks(total, bs, perturbed, what="AOPC")

    curve = clean[:, None] - steps.view(B, L)
    return (curve.sum(1) / (L + 1)).to(home), curve.to(home)


def _cost(options, info):
    size = info.input_size if info is not None and info.input_size else (224, 224)
    patches = (size[0] // options.patch_size) * (size[1] // options.patch_size)
    return Cost(forwards=min(options.regions, patches),  # one per step; the clean forward is shared
                note="" if info is not None and info.input_size else "input size unknown, 224×224 assumed")


@register_group(
    "aopc", options_from=region_perturbation, skip=("clean_logits",), cost=_cost,
    fields=(PerImage("aopc", "float64", "AOPC: 1/(L+1) Σ_k [f_c(x) − f_c(x⁽ᵏ⁾)], k = 0…L (Quantus RegionPerturbation)"),
            PerImage("aopc_curve", "list<float32>", "f_c(x) − f_c(x⁽ᵏ⁾) for k = 1…L: Quantus's returned curve")),
    metrics=(Metric("AOPC", "area over the MoRF perturbation curve", higher_is_better=True),))
def _aopc(batch: MetricBatch, **options) -> dict[str, torch.Tensor]:
    value, curve = region_perturbation(batch.bundle, batch.images, batch.maps, batch.targets,
                                       clean_logits=batch.logits, **options)
    return {"aopc": value, "aopc_curve": curve.float()}


__all__ = ["BASELINES", "check_input_size", "region_perturbation"]
