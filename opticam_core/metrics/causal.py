"""Insertion and deletion (Petsiuk et al., RISE; SPEC §4), batched across images and steps.

Class: the prediction on the clean image. Pixels are ranked by S, descending; ties are broken by
raster order (row-major: the lower i·W + j first), a stable sort, as TorchCAM does, so Fake-CAM
(ones everywhere but the top-left pixel) deletes rows from the top. With k pixels per step
(default ceil(H·W / steps): 224 at 224×224) the curves have points after 0, k, 2k, …, H·W
pixels (the last step may be partial):

- deletion: from x, the first c pixels set to 0;
- insertion: from blur(x), the first c pixels restored from x. blur: the RISE kernel, a 11×11
  Gaussian of σ = 5 made like RISE's (scipy's gaussian_filter of a unit impulse, which folds the
  truncated tails back in by reflection), convolved per channel with zero padding.

The score at each point is the softmax probability of the class; the AUC is the trapezoid rule
over the fraction of pixels c / (H·W), in [0,1]. (RISE divides by the number of steps; the two
agree whenever the steps are equal, as at 224×224.)

Cost: the clean image's probability is the first deletion point and the last insertion point, and
the all-zero image (deletion's last point) is the same for every image, so an image costs
2·steps − 1 forwards plus one shared forward per call. All step images of all images go through
the network together, `batch_size` at a time.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import AfterValidator

from ..cost import Cost, pixels
from ..fields import PerImage
from ..options import PositiveFloat, PositiveInt
from ._forward import chunked_log_probs, class_log_probs, resolve_batch_size
from .classification import check_batch, clean_logits_of
from .registry import Metric, MetricBatch, register_group

RISE_BLUR = (11, 5.0)


def _odd(size: int) -> int:
    if size % 2 == 0:
        raise ValueError("the blur kernel's size must be odd (it is centred on the pixel)")
    return size


OddSize = Annotated[PositiveInt, AfterValidator(_odd)]


def rise_kernel(size: int = 11, sigma: float = 5.0, *, truncate: float = 4.0) -> torch.Tensor:
    """The RISE blur kernel, size×size float32: gaussian_filter(impulse, sigma) in scipy's
    'reflect' mode, computed in torch. Separable, so it is the outer product of the 1-D response."""
    radius = int(truncate * sigma + 0.5)
    d = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (d / sigma) ** 2)
    w = w / w.sum()
    # out[i] = Σ_d w[d] · impulse[reflect(i + d)]: add w[d] to out[i] wherever reflect(i + d) is the centre.
    i = torch.arange(size, dtype=torch.long)
    q = (i[:, None] + d.long()[None, :]) % (2 * size)
    folded = torch.where(q < size, q, 2 * size - 1 - q)
    one_d = (w[None, :] * (folded == size // 2)).sum(1)
    return torch.outer(one_d, one_d).float()


def blur_images(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-channel convolution of B×C×H×W images with a k×k kernel, zero padding (as RISE)."""
    C = images.shape[1]
    k = kernel.to(images)[None, None].expand(C, 1, *kernel.shape)
    return F.conv2d(images, k, padding=kernel.shape[-1] // 2, groups=C)


def step_counts(pixels: int, steps: int = 224, pixels_per_step: int | None = None) -> torch.Tensor:
    """Pixels changed after each point of the curve: 0, k, 2k, …, `pixels` (int64)."""
    if pixels_per_step is None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        pixels_per_step = math.ceil(pixels / steps)
    if pixels_per_step < 1:
        raise ValueError(f"pixels_per_step must be >= 1, got {pixels_per_step}")
    n = math.ceil(pixels / pixels_per_step)
    return (torch.arange(n + 1) * pixels_per_step).clamp_max(pixels)


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """B×(H·W) int64: the position of each pixel in the descending order of S (ties: raster order)."""
    flat = maps.flatten(1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


@torch.no_grad()
def insertion_deletion(bundle, images: torch.Tensor, maps: torch.Tensor, *, classes=None,
                       clean_logits: torch.Tensor | None = None, steps: PositiveInt = 224,
                       pixels_per_step: PositiveInt | None = None,
                       blur: tuple[OddSize, PositiveFloat] | None = RISE_BLUR,
                       batch_size: PositiveInt | None = None):
    """(insertion_auc B, deletion_auc B, curves) for maps S (B×H×W) of `images`.

    classes: the class whose probability is tracked; default the prediction on the clean image
    (from `clean_logits` when given). blur: (size, sigma) of the RISE blur that insertion
    starts from, or None to insert into a black image. batch_size: step images per forward
    (default 8 on a CPU; on a GPU what its free memory holds, `opticam_core.chunking`).
    curves: {"insertion", "deletion": B×(n+1) float64, "fractions": n+1 float64, "classes": B}.
    AUCs are float64 in [0,1].
    """
    home = images.device
    images, maps, _ = check_batch(bundle, images, maps)
    dev = images.device
    B, C, H, W = images.shape
    HW = H * W
    logits = clean_logits_of(bundle, images, clean_logits)
    classes = logits.argmax(1) if classes is None else torch.as_tensor(classes, device=dev).long().reshape(-1)
    clean = class_log_probs(logits, classes).exp()

    counts = step_counts(HW, steps, pixels_per_step).to(dev)
    n = len(counts) - 1
    ranks = pixel_ranks(maps)
    flat = images.flatten(2)
    if blur is None:
        base = torch.zeros_like(flat)
    else:
        base = blur_images(images, rise_kernel(*blur).to(dev)).flatten(2)

    # Jobs per image: deletion after counts[1 … n−1], insertion after counts[0 … n−1].
    per = 2 * n - 1
    job = torch.arange(B * per, device=dev)
    img, local = job // per, job % per
    inserting = local >= n - 1
    count = torch.where(inserting, counts[(local - (n - 1)).clamp_min(0)], counts[(local + 1).clamp_max(n)])

    def build(part: slice):
        b, c, ins = img[part], count[part], inserting[part]
        changed = ranks[b] < c[:, None]  # C×HW: pixels deletion removed / insertion restored
        from_image = changed == ins[:, None]
        substrate = torch.where(ins[:, None, None], base[b], 0.0)
        x = torch.where(from_image[:, None, :], flat[b], substrate)
        return x.view(-1, C, H, W), classes[b]

    # per step image: the gathered image and substrate, the composite, the two pixel masks
    bs = resolve_batch_size(batch_size, dev, model=bundle.model, example=images, copies=3.5, total=B * per)
    probs = chunked_log_probs(bundle.model, B * per, build, bs, dev).exp().view(B, per)
    black = class_log_probs(bundle.model(torch.zeros(1, C, H, W, device=dev)).expand(B, -1), classes).exp()

    deletion = torch.cat([clean[:, None], probs[:, :n - 1], black[:, None]], dim=1)
    insertion = torch.cat([probs[:, n - 1:], clean[:, None]], dim=1)
    fractions = counts.double() / HW
    ins_auc = torch.trapezoid(insertion, fractions, dim=1)
    del_auc = torch.trapezoid(deletion, fractions, dim=1)
    curves = {"insertion": insertion.to(home), "deletion": deletion.to(home),
              "fractions": fractions.to(home), "classes": classes.to(home)}
    return ins_auc.to(home), del_auc.to(home), curves


def _cost(options, info):
    total, note = pixels(info)
    n = len(step_counts(total, options.steps, options.pixels_per_step)) - 1
    # 2n − 1 step images (both curves' ends are the clean image and the black one).
    return Cost(forwards=2 * n - 1, note="; ".join(x for x in (note, "+1 black forward per batch") if x))


@register_group(
    "insertion_deletion", options_from=insertion_deletion, skip=("classes", "clean_logits"), cost=_cost,
    fields=(PerImage("insertion", "float64", "insertion AUC in [0,1], trapezoid over the fraction of pixels"),
            PerImage("deletion", "float64", "deletion AUC in [0,1]"),
            PerImage("insertion_curve", "list<float32>", "probability of pred after each insertion step (steps+1 points)"),
            PerImage("deletion_curve", "list<float32>", "probability of pred after each deletion step (steps+1 points)")),
    metrics=(Metric("I", "insertion", higher_is_better=True), Metric("D", "deletion", higher_is_better=False)))
def _insertion_deletion(batch: MetricBatch, **options) -> dict[str, torch.Tensor]:
    ins, dele, curves = insertion_deletion(batch.bundle, batch.images, batch.maps, classes=batch.pred,
                                           clean_logits=batch.logits, **options)
    return {"insertion": ins, "deletion": dele, "insertion_curve": curves["insertion"].float(),
            "deletion_curve": curves["deletion"].float()}
