"""LIME on superpixels (Ribeiro et al. 2016), as the official `lime` package's `lime_image` computes
it, for the target class, with the sampled images of the whole batch sharing forwards.

Per image, as `LimeImageExplainer(random_state=seed).explain_instance(image, classifier_fn,
labels=(target,), top_labels=None)` with its other defaults:

1. Superpixels: skimage's quickshift(kernel_size 4, max_dist 200, ratio 0.2) on the image as the
   model gets it (H×W×3 in [0,1]). On the CPU, one image after the other: it is no model evaluation.
2. Samples: a fresh `numpy.random.RandomState(random_state)`; one `randint(0, 1000)` draw (lime's
   seed for quickshift, whose `random_seed` became `rng` in newer skimage, so lime's wrapper drops
   it and quickshift keeps its own tie-break seed, 42; drawn all the same, so that what follows is
   lime's stream), then `randint(0, 2)` for num_samples × superpixels on/off bits, row 0 all on.
   Off superpixels take `hide_color`, or (None) the superpixel's mean colour: lime's "fudged image".
3. Labels: the classifier's output for the target, as lime's `classifier_fn` gives it: softmax
   probabilities by default (lime's documented contract), or logits.
4. Surrogate: weights sqrt(exp(−d²/kernel_width²)) of the cosine distance to row 0 (lime_image
   uses no ×100, unlike lime_text), then sklearn's Ridge(alpha=1, fit_intercept) with those sample
   weights, solved in closed form on the device in float64. lime's default num_features (100000)
   keeps every superpixel, so its 'auto' selection changes nothing; smaller num_features select
   as lime_base does ('forward_selection' up to 6, else 'highest_weights'; 'lasso_path' is not
   offered).

Map: each pixel carries its superpixel's weight. `positive_only` (the default of lime_image's
`get_image_and_mask`) keeps the superpixels that speak for the class, relu as for the CAMs, then
min–max over the image; the constant-map rule applies (all weights ≤ 0: zeros, flagged).
"""

from __future__ import annotations

from typing import Annotated, Literal

import annotated_types as at
import numpy as np
import torch
from pydantic import AfterValidator

from ..chunking import run_chunks
from ..cost import Cost
from ..fields import PerImage
from ..maps import constant_maps, normalize
from ..options import (
    Bool,
    Float,
    Int,
    ListOf,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    Probability,
)
from .base import Context
from .perturbation import CPU_CHUNK, GPU_CHUNK
from .registry import register

SELECTIONS = ("auto", "none", "forward_selection", "highest_weights")
DISTANCES = ("cosine", "euclidean")
#: lime_base's 'auto': forward selection up to this many features, 'highest_weights' beyond.
AUTO_FORWARD_MAX = 6
#: lime_base's Ridge for ranking features under 'highest_weights'.
RANKING_ALPHA = 0.01

EXTRAS = (
    PerImage("lime_superpixels", "int64", "LIME: number of superpixels (features of the surrogate)"),
    PerImage("lime_score", "float64", "LIME: weighted R² of the surrogate on its samples (lime's `score`)"),
    PerImage("lime_weights", "tensor", "LIME: B×H×W, each pixel its superpixel's surrogate weight (signed)"),
    PerImage("lime_segments", "tensor", "LIME: B×H×W superpixel labels 0…superpixels−1"),
)


def _one_or_three(colour: tuple) -> tuple:
    if len(colour) not in (1, 3):
        raise ValueError("a colour is one grey value or three (R, G, B)")
    return colour


Colour = Annotated[ListOf(Probability), AfterValidator(_one_or_three)]
Seed = Annotated[Int, at.Ge(0), at.Le(2**32 - 1)]   # numpy.random.RandomState's range
KernelSize = Annotated[Float, at.Ge(1)]             # quickshift refuses < 1


# --------------------------------------------------------------------------------------------
# Superpixels and samples (CPU, numpy: lime's own generator, so the bits equal lime's)


def segment(image_hwc: np.ndarray, *, kernel_size: float, max_dist: float, ratio: float, sigma: float,
            convert2lab: bool, seed: int) -> np.ndarray:
    """quickshift labels of one H×W×3 image, relabelled 0…F−1 (they already are; lime relies on it)."""
    try:
        from skimage.segmentation import quickshift
    except ImportError as err:  # the core does not require it; the job's extra does
        raise ImportError("LIME segments with scikit-image's quickshift: pip install scikit-image "
                          "(or 'opticam[job]')") from err

    labels = quickshift(image_hwc, kernel_size=kernel_size, max_dist=max_dist, ratio=ratio, sigma=sigma,
                        convert2lab=convert2lab, rng=seed)
    return np.unique(labels, return_inverse=True)[1].reshape(labels.shape)


def sample_bits(n_features: int, num_samples: int, random_state: int) -> np.ndarray:
    """lime_image's num_samples × n_features on/off matrix for a fresh explainer seeded `random_state`."""
    rs = np.random.RandomState(random_state)
    rs.randint(0, high=1000)  # explain_instance's segmentation seed: drawn first, whatever it is used for
    bits = rs.randint(0, 2, num_samples * n_features).reshape((num_samples, n_features))
    bits[0, :] = 1
    return bits


# --------------------------------------------------------------------------------------------
# The surrogate (torch, float64, batched; padded features are all-zero columns)


def kernel_weights(bits: torch.Tensor, n_features: torch.Tensor, kernel_width: float, distance: str) -> torch.Tensor:
    """sqrt(exp(−d²/w²)) of each row's distance to the all-on row 0 (sklearn's pairwise_distances)."""
    on = bits.sum(-1)
    F = n_features[:, None].to(on.dtype)
    if distance == "cosine":
        sim = torch.where(on > 0, on / (on.sqrt() * F.sqrt()), torch.zeros_like(on))  # sklearn: 0 for a zero row
        d = (1 - sim).clamp(0, 2)
    else:
        d = (F - on).sqrt()
    return torch.sqrt(torch.exp(-(d ** 2) / kernel_width ** 2))


def _centred(X, y, w):
    sw = w.sum(1, keepdim=True)
    xm = (w[..., None] * X).sum(1) / sw
    ym = (w * y).sum(1, keepdim=True) / sw
    return X - xm[:, None], y - ym, xm, ym[:, 0]


def ridge(X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, alpha: float):
    """sklearn's Ridge(alpha, fit_intercept=True).fit(X[:, keep], y, sample_weight=w), per image.

    X B×N×F, y and w B×N, keep B×F. Columns left out are zeroed, which with alpha > 0 gives them
    a zero coefficient and the others exactly the subset fit. Returns coef (B×F), intercept, and
    the weighted R² (sklearn's `score`: 1 when y is constant and fitted exactly, else 0 there).
    """
    Xc, yc, xm, ym = _centred(X, y, w)
    Xc = Xc * keep[:, None]
    Xw = Xc * w[..., None]
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    coef = torch.linalg.solve(Xc.transpose(1, 2) @ Xw + alpha * eye, (Xw * yc[..., None]).sum(1))
    intercept = ym - (xm * keep * coef).sum(-1)
    residual = (w * (yc - (Xc * coef[:, None]).sum(-1)) ** 2).sum(1)
    total = (w * yc ** 2).sum(1)
    score = torch.where(total > 0, 1 - residual / total.clamp_min(torch.finfo(X.dtype).tiny),
                        (residual == 0).to(X.dtype))
    return coef, intercept, score


def _forward_selection(X, y, w, valid, k: torch.Tensor):
    """lime_base.forward_selection: greedily add the feature whose unregularised least-squares fit
    (Ridge alpha=0) scores the highest weighted R², first index on ties, min(k, F) rounds.

    The fits come from the centred weighted Gram matrix: with an intercept every column is centred
    on its own, so each candidate set's normal equations are a sub-block of it, and its R² is
    bᵀβ / TSS, ranked here as bᵀβ (TSS is per image). pinv gives sklearn's least-squares fallback
    where a block is singular.
    """
    Xc, yc, _, _ = _centred(X, y, w)
    Xw = Xc * w[..., None]
    gram = Xc.transpose(1, 2) @ Xw
    rhs = (Xw * yc[..., None]).sum(1)
    B, F = valid.shape
    rows = torch.arange(B, device=X.device)
    keep = torch.zeros_like(valid)
    used = torch.empty(B, 0, dtype=torch.long, device=X.device)
    for r in range(int(k.max())):
        cand = torch.arange(F, device=X.device).expand(B, F)
        sets = torch.cat([used[:, None, :].expand(B, F, r), cand[..., None]], -1)      # B×F×(r+1)
        block = gram[rows[:, None, None, None], sets[..., :, None], sets[..., None, :]]
        b = rhs[rows[:, None, None], sets]
        explained = (b * (torch.linalg.pinv(block, hermitian=True) @ b[..., None])[..., 0]).sum(-1)
        explained = explained.masked_fill(~valid | keep, -torch.inf)
        best = explained.argmax(1)
        active = r < k
        best = torch.where(active, best, used[:, 0] if r else best)  # finished images repeat a pick
        keep[rows[active], best[active]] = True
        used = torch.cat([used, best[:, None]], 1)
    return keep


def _highest_weights(X, y, w, valid, k: torch.Tensor):
    """lime_base 'highest_weights': Ridge(alpha=0.01) on every feature, keep the k largest |coef|
    (data row 0 is all ones, so coef × row 0 is coef), ties in feature order (a stable sort)."""
    coef, _, _ = ridge(X, y, w, valid, RANKING_ALPHA)
    order = coef.abs().masked_fill(~valid, -1).sort(dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=X.device).expand_as(order))
    return valid & (rank < k[:, None])


def select_features(X, y, w, n_features: torch.Tensor, num_features: int | None, method: str) -> torch.Tensor:
    """B×F mask of the features lime_base's `feature_selection(…, num_features, method)` keeps."""
    F = X.shape[-1]
    valid = torch.arange(F, device=X.device)[None] < n_features[:, None]
    if method == "none" or num_features is None:
        return valid
    k = n_features.clamp(max=num_features)
    if method == "auto":
        method = "forward_selection" if num_features <= AUTO_FORWARD_MAX else "highest_weights"
    if method == "forward_selection":
        return _forward_selection(X, y, w, valid, k)
    return _highest_weights(X, y, w, valid, k)


# --------------------------------------------------------------------------------------------
# The method


def _fill(images: torch.Tensor, segments: torch.Tensor, n_max: int, hide_color) -> torch.Tensor:
    """The image each hidden superpixel is taken from: per-superpixel mean colours, or `hide_color`."""
    if hide_color is not None:
        colour = torch.tensor(hide_color, dtype=images.dtype, device=images.device)
        return colour.view(1, -1, 1, 1).expand_as(images)
    B, C = images.shape[:2]
    flat = segments.flatten(1)
    pixels = images.flatten(2).double()
    sums = torch.zeros(B, C, n_max, dtype=torch.float64, device=images.device)
    sums.scatter_add_(2, flat[:, None].expand(B, C, -1), pixels)
    counts = torch.zeros(B, n_max, dtype=torch.float64, device=images.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))
    means = sums / counts.clamp_min(1)[:, None]
    return means.gather(2, flat[:, None].expand(B, C, -1)).view_as(images).to(images.dtype)


def _scores(logits: torch.Tensor, targets: torch.Tensor, output: str) -> torch.Tensor:
    out = torch.softmax(logits, dim=1) if output == "probability" else logits
    return out.gather(1, targets[:, None])[:, 0].double()


@register("lime", name="LIME", family="surrogate", rank=90, extras=EXTRAS,
          cost=lambda o: Cost(forwards=o.num_samples - 1, shared={"forward"}))
def lime(ctx: Context, *, num_samples: PositiveInt = 1000, kernel_width: PositiveFloat = 0.25,
         distance: Literal[DISTANCES] = "cosine", hide_color: Colour | None = None,
         output: Literal["probability", "logit"] = "probability", ridge_alpha: PositiveFloat = 1.0,
         num_features: PositiveInt | None = None, feature_selection: Literal[SELECTIONS] = "auto",
         quickshift_kernel_size: KernelSize = 4.0, quickshift_max_dist: PositiveFloat = 200.0,
         quickshift_ratio: Probability = 0.2, quickshift_sigma: NonNegativeFloat = 0.0,
         quickshift_convert2lab: Bool = True, quickshift_seed: Seed = 42,
         random_state: Seed = 0, positive_only: Bool = True, batch_size: PositiveInt | None = None):
    """LIME (lime_image): a weighted ridge surrogate of the target's output over superpixels on/off.

    Model evaluations per image: num_samples (row 0, the image itself, is the clean forward the
    methods of a call share; the num_samples − 1 others run here, all the batch's in chunks).

    num_samples, kernel_width, distance (lime's distance_metric), hide_color (None: each
    superpixel's mean colour; else one grey or three RGB values in [0,1]), num_features and
    feature_selection (None: every superpixel, as lime's default num_features=100000):
    lime_image's settings and defaults. output: what lime's classifier_fn returns (softmax
    probabilities, its contract) or logits. ridge_alpha: its Ridge's alpha. quickshift_*: its
    segmentation (seed: quickshift's tie-break `rng`, skimage's 42). random_state: the seed of a
    fresh numpy RandomState per image, as `LimeImageExplainer(random_state=…)` made for each image
    (lime's default None is unseeded; a run must be reproducible, and an image's samples must
    not depend on its batch). positive_only: the map keeps positive weights (lime_image's
    `get_image_and_mask` default), else signed weights are min–max normalised. batch_size:
    sampled images per forward (default 8 on the CPU; on a GPU what its free memory
    holds, `opticam_core.chunking`).
    """
    images, device = ctx.images, ctx.device
    B, _, H, W = images.shape
    host = images.detach().permute(0, 2, 3, 1).cpu()
    host = (host if host.dtype in (torch.float32, torch.float64) else host.float()).numpy()  # numpy has no bf16
    segs = [segment(img, kernel_size=quickshift_kernel_size, max_dist=quickshift_max_dist, ratio=quickshift_ratio,
                    sigma=quickshift_sigma, convert2lab=quickshift_convert2lab, seed=quickshift_seed) for img in host]
    n_features = [int(s.max()) + 1 for s in segs]
    n_max = max(n_features)
    bits = np.zeros((B, num_samples, n_max), dtype=bool)
    for i, F in enumerate(n_features):
        bits[i, :, :F] = sample_bits(F, num_samples, random_state)

    segments = torch.from_numpy(np.stack(segs)).to(device)
    flat = segments.flatten(1)
    on_bits = torch.from_numpy(bits).to(device)
    fill = _fill(images, segments, n_max, hide_color)

    y = torch.empty(B, num_samples, dtype=torch.float64, device=device)
    y[:, 0] = _scores(ctx.logits(), ctx.targets, output)
    rest = num_samples - 1

    def sample(start: int, stop: int) -> None:
        pair = torch.arange(start, stop, device=device)
        b, n = pair // rest, pair % rest + 1
        shown = on_bits[b, n].gather(1, flat[b]).view(-1, 1, H, W)
        y[b, n] = _scores(ctx.model(torch.where(shown, images[b], fill[b])), ctx.targets[b], output)

    with torch.no_grad():
        # per sample: the image and its fill gathered, the composite, the mask
        run_chunks(B * rest, ctx.chunk(CPU_CHUNK, GPU_CHUNK, batch_size, total=B * rest, copies=3.5), sample,
                   what="LIME")

    X = on_bits.double()
    counts = torch.tensor(n_features, device=device)
    w = kernel_weights(X, counts, kernel_width, distance)
    keep = select_features(X, y, w, counts, num_features, feature_selection)
    coef, _, score = ridge(X, y, w, keep, ridge_alpha)

    weights = coef.gather(1, flat).view(B, H, W)
    raw = (weights.clamp_min(0) if positive_only else weights).to(images.dtype)
    return normalize(raw), {"constant": constant_maps(raw), "lime_superpixels": counts.long(), "lime_score": score,
                            "lime_weights": weights, "lime_segments": segments.long()}
