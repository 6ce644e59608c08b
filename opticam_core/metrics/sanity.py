"""The randomisation sanity check (Adebayo et al. 2018; the Opti-CAM paper's App. G, Fig. A6): the
method's map on the trained model against its maps on the same model with its top N blocks
re-initialised (`opticam_core.models.randomize`), N = 1…`blocks`, per image.

Per image and N, four similarities between the original map S and the map S_N of the model with
N blocks randomised (index 0 of every vector: S against itself, 1 by definition; NaN where the
method failed on that image or a measure is undefined, e.g. a constant map has no ranks):

- `sanity_spearman`: Spearman rank correlation of S and S_N as vectors of pixels, ties given their
  average rank (as `scipy.stats.spearmanr`).
- `sanity_spearman_abs`: the same on |S| and |S_N|. Adebayo's two variants differ only for signed
  attributions (their "no abs" keeps the sign, "abs" ranks the magnitudes). Every method here
  returns maps after its own normalisation to [0,1] (`Explanation.maps`), so |S| = S and the two
  columns are equal by construction; the column is kept so that the figure has the paper's four
  panels, and so that it changes meaning only if a method ever returns signed maps.
- `sanity_ssim`: SSIM (`skimage.metrics.structural_similarity`) with data_range 1 and, as in
  Adebayo's code, a Gaussian window (σ 1.5, `ssim_window="gaussian"`) and skimage's default
  sample covariance; `"uniform"` gives skimage's default 7×7 window. (Adebayo's old
  `compare_ssim` inferred data_range 2 from the float dtype; our maps live in [0,1], so 1.)
- `sanity_hog`: the rank correlation of the HOG descriptors (`skimage.feature.hog`, 9
  orientations, `hog_cell`×`hog_cell` pixels per cell (16, as Adebayo's code), 3×3 cells per block,
  L2-Hys) of S and S_N: Adebayo's code takes Spearman (`spr(normal_hog, rand_hog)`) of them,
  not Pearson, and so do we. Maps smaller than 3 cells a side have no descriptor: NaN.

Which class: `target="same"` (default) explains, on every randomised model, the class the original
map was made for (the row's target), so that only the model changes; `"predicted"` explains each
randomised model's own top-1 class, as Adebayo's code does.

Cost: the method runs `blocks` more times per image (one `explain` call per N on the whole batch);
Spearman and SSIM are batched on the device in float64; HOG runs in scikit-image on the CPU (about
a millisecond per 224×224 map). The randomised models are built once per (model, N, seed) and
kept in a small cache, not once per batch.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal, Mapping, Sequence

import numpy as np
import torch

from ..cost import Cost
from ..fields import PerImage
from ..models.randomize import cascade_blocks, randomized
from ..options import Bool, NonNegativeInt, OptionsError, PositiveInt
from .registry import MetricBatch, register_group

WHERE = "metrics.sanity"
#: measure → (field, label for plots)
MEASURES = {
    "spearman": ("sanity_spearman", "Spearman rank correlation"),
    "spearman_abs": ("sanity_spearman_abs", "Spearman rank correlation (abs)"),
    "ssim": ("sanity_ssim", "SSIM"),
    "hog": ("sanity_hog", "rank correlation of HOG"),
}
SSIM_K1, SSIM_K2 = 0.01, 0.03


# ----------------------------------------------------------------------------------------------
# Similarities (batched, float64)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Row-wise ranks 1…n of a B×n tensor, tied values sharing their average rank (scipy's
    `rankdata(method="average")`); rows holding a NaN come back all NaN."""
    x = x.double()
    B, n = x.shape
    v, order = x.sort(1)
    new = torch.ones_like(v, dtype=torch.bool)
    new[:, 1:] = v[:, 1:] != v[:, :-1]
    group = new.cumsum(1) - 1 + torch.arange(B, device=x.device)[:, None] * n  # unique over the batch
    pos = torch.arange(n, device=x.device, dtype=torch.float64).expand(B, n).reshape(-1)
    flat = group.reshape(-1)
    first = torch.full((B * n,), float(n), dtype=torch.float64, device=x.device).scatter_reduce(0, flat, pos, "amin")
    last = torch.full((B * n,), -1.0, dtype=torch.float64, device=x.device).scatter_reduce(0, flat, pos, "amax")
    avg = ((first + last) / 2 + 1)[flat].view(B, n)
    ranks = torch.empty_like(avg).scatter_(1, order, avg)
    return torch.where(torch.isnan(x).any(1, keepdim=True), torch.nan, ranks)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of B×n tensors (NaN where a row is constant)."""
    a, b = a.double(), b.double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    den = (a.square().sum(1) * b.square().sum(1)).sqrt()
    r = (a * b).sum(1) / den
    return torch.where(den > 0, r.clamp(-1, 1), torch.nan)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Spearman rank correlation of B×… tensors (flattened per row), as
    `scipy.stats.spearmanr` on each pair: Pearson of the average ranks."""
    return pearson(average_ranks(a.flatten(1)), average_ranks(b.flatten(1)))


def _window(kind: str, dtype, device) -> torch.Tensor:
    """skimage's SSIM window as a 1-D kernel: Gaussian σ 1.5 truncated at 3.5σ (11 taps, as
    scipy.ndimage.gaussian_filter) or uniform 7 taps."""
    if kind == "gaussian":
        sigma, radius = 1.5, int(3.5 * 1.5 + 0.5)
        x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
        w = torch.exp(-0.5 * (x / sigma) ** 2)
        return w / w.sum()
    return torch.full((7,), 1.0 / 7, dtype=dtype, device=device)


def ssim(a: torch.Tensor, b: torch.Tensor, *, window: Literal["gaussian", "uniform"] = "gaussian",
         data_range: float = 1.0) -> torch.Tensor:
    """Row-wise SSIM of B×H×W maps, equal to `skimage.metrics.structural_similarity(a, b,
    data_range=data_range, gaussian_weights=window == "gaussian")` per pair.

    skimage filters the whole image (reflecting at the edges) and then averages only over the
    pixels at least a window radius from the edge, where the reflection never enters: a filter
    without padding gives exactly those values. The separable filter runs as two products with
    banded matrices (5× faster than float64 convolutions on a CPU)."""
    a, b = a.double(), b.double()
    w = _window(window, a.dtype, a.device)
    k = len(w)
    cov_norm = k * k / (k * k - 1.0)  # skimage's use_sample_covariance=True
    H, W = a.shape[-2:]
    if H < k or W < k:
        raise ValueError(f"SSIM needs maps of at least {k}×{k} pixels, got {H}×{W}")

    def band(n):  # (n−k+1)×n: row i holds the window at columns i … i+k−1
        rows = torch.arange(n - k + 1, device=a.device)[:, None] + torch.arange(k, device=a.device)
        return torch.zeros(n - k + 1, n, dtype=a.dtype, device=a.device).scatter_(1, rows, w.expand(n - k + 1, k))

    kh, kw = band(H), band(W).T

    def filt(t):  # B×H×W → B×(H−k+1)×(W−k+1)
        return kh @ t @ kw

    ux, uy = filt(a), filt(b)
    uxx, uyy, uxy = filt(a * a), filt(b * b), filt(a * b)
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def hog_descriptors(maps: torch.Tensor, cell: int = 16) -> np.ndarray:
    """B×D HOG descriptors (skimage.feature.hog: 9 orientations, cell×cell pixels per cell, 3×3
    cells per block, L2-Hys); rows of NaN for NaN maps and for maps too small for one block."""
    from skimage.feature import hog

    m = maps.detach().double().cpu().numpy()
    H, W = m.shape[-2:]
    if H // cell < 3 or W // cell < 3:
        return np.full((len(m), 0), np.nan)
    out = None
    for i, x in enumerate(m):
        if np.isnan(x).any():
            continue
        d = hog(x, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(3, 3), block_norm="L2-Hys")
        if out is None:
            out = np.full((len(m), d.size), np.nan)
        out[i] = d
    return np.full((len(m), 0), np.nan) if out is None else out


def hog_similarity(a: torch.Tensor, b: torch.Tensor, *, cell: int = 16) -> torch.Tensor:
    """Row-wise Spearman correlation of the HOG descriptors of B×H×W maps (Adebayo's HOG measure)."""
    return _hog_vs(hog_descriptors(a, cell), hog_descriptors(b, cell), a.device)


def _hog_vs(da: np.ndarray, db: np.ndarray, device) -> torch.Tensor:
    if da.shape[1] == 0 or db.shape[1] == 0:
        return torch.full((len(da),), torch.nan, dtype=torch.float64, device=device)
    return spearman(torch.from_numpy(da), torch.from_numpy(db)).to(device)


def similarities(original: torch.Tensor, others: torch.Tensor, *, hog_cell: int = 16,
                 ssim_window: str = "gaussian") -> dict[str, torch.Tensor]:
    """measure → B×M float64: each of the B original maps (B×H×W) against its M other maps
    (B×M×H×W), for the four measures of `MEASURES`."""
    B, M = others.shape[:2]
    flat = others.reshape(B * M, *others.shape[2:])
    orig = original[:, None].expand(B, M, *original.shape[1:]).reshape(B * M, *original.shape[1:])
    def spread(r):  # B×n → (B·M)×n, each original beside its M others
        return r[:, None].expand(B, M, -1).reshape(B * M, -1)

    # |S| = S for maps without negatives (all of ours): rank them once
    r_flat, r_orig = average_ranks(flat.flatten(1)), average_ranks(original.flatten(1))
    r_flat_abs = average_ranks(flat.abs().flatten(1)) if (flat < 0).any() else r_flat
    r_orig_abs = average_ranks(original.abs().flatten(1)) if (original < 0).any() else r_orig
    hog_orig = hog_descriptors(original, hog_cell)
    out = {
        "spearman": pearson(spread(r_orig), r_flat),
        "spearman_abs": pearson(spread(r_orig_abs), r_flat_abs),
        "ssim": ssim(orig, flat, window=ssim_window),
        "hog": _hog_vs(np.repeat(hog_orig, M, axis=0), hog_descriptors(flat, hog_cell), original.device),
    }
    bad = torch.isnan(flat.flatten(1)).any(1) | torch.isnan(orig.flatten(1)).any(1)
    return {k: torch.where(bad, torch.nan, v).view(B, M) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# The randomised models, built once per actor


class _Cache:
    """A small LRU of randomised bundles keyed by (the model object, N, seed, reset_stats)."""

    def __init__(self, size: int = 12):
        self.size = size
        self.items: OrderedDict = OrderedDict()

    def get(self, bundle, n: int, seed: int, reset_stats: bool):
        key = (id(bundle.model), n, seed, reset_stats)
        hit = self.items.get(key)
        # the source is kept and compared: an id can be reused once a model is freed
        if hit is not None and hit[0] is bundle.model and hit[1].device == bundle.device:
            self.items.move_to_end(key)
            return hit[1]
        made = randomized(bundle, n, seed, reset_stats=reset_stats)
        self.items[key] = (bundle.model, made)
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return made

    def clear(self):
        self.items.clear()


RANDOMIZED = _Cache()


def check_blocks_of(bundle, blocks: int) -> int:
    """The number of blocks of `bundle`; OptionsError naming metrics.sanity.blocks when fewer
    than `blocks`."""
    count = len(cascade_blocks(bundle))
    if blocks > count:
        raise OptionsError([f"{WHERE}.blocks: {blocks}, but {bundle.name} has only {count} blocks to randomise"])
    return count


def sanity_check(bundle, images: torch.Tensor, targets: torch.Tensor, maps: torch.Tensor, rerun, *,
                 blocks: PositiveInt = 5, seed: NonNegativeInt = 0, target: Literal["same", "predicted"] = "same",
                 hog_cell: PositiveInt = 16, ssim_window: Literal["gaussian", "uniform"] = "gaussian",
                 reset_stats: Bool = False) -> dict[str, torch.Tensor]:
    """measure → B×(blocks+1) float64 similarities of `maps` (B×H×W, the method on `bundle`) to the
    method's maps on `bundle` with its top N blocks randomised, N = 0…blocks (N = 0: the maps
    against themselves). `rerun(images, targets, *, bundle=…)` runs the method (`Rerun`).

    blocks: the most blocks randomised (`opticam_core.models.randomize` lists them per model).
    seed: the re-initialisation's seed. target: "same" (the maps' classes) or "predicted" (each
    randomised model's top-1, as Adebayo's code). hog_cell: pixels per HOG cell. ssim_window:
    "gaussian" (σ 1.5, Adebayo) or "uniform" (7×7, skimage's default). reset_stats: also reset the
    BatchNorm running statistics of the randomised blocks (default: kept, as Adebayo)."""
    check_blocks_of(bundle, blocks)
    others = []
    for n in range(1, blocks + 1):
        model = RANDOMIZED.get(bundle, n, seed, reset_stats)
        classes = targets
        if target == "predicted":
            with torch.no_grad():
                classes = model.model(images).argmax(1)
        others.append(rerun(images, classes, bundle=model).to(maps.device, maps.dtype))
    sims = similarities(maps, torch.stack([maps, *others], 1), hog_cell=hog_cell, ssim_window=ssim_window)
    return sims


def _cost(options, info) -> Cost:
    extra = options.blocks if options.target == "predicted" else 0
    return Cost(forwards=extra, reruns=options.blocks,
                note=f"the method on {options.blocks} randomised copies of the model")


@register_group(
    "sanity", options_from=sanity_check, calls_method=True, cost=_cost,
    fields=tuple(PerImage(field, "list<float32>",
                          f"{label} of the map to the method's map with N top blocks randomised, N = 0…blocks")
                 for field, label in MEASURES.values()),
    metrics=())
def _sanity(batch: MetricBatch, **options) -> dict[str, torch.Tensor]:
    sims = sanity_check(batch.bundle, batch.images, batch.made_for, batch.maps, batch.rerun, **options)
    return {MEASURES[k][0]: v for k, v in sims.items()}


# ----------------------------------------------------------------------------------------------
# Aggregation


def aggregate_sanity(values: Mapping[str, Sequence], *, weights=None) -> dict[str, np.ndarray]:
    """measure → the mean similarity per N (an array of blocks+1 values; R×(blocks+1) with
    bootstrap `weights`, an R×rows matrix as `aggregate` takes) over the rows without `error`
    whose value at that N is finite. A measure whose column is missing is left out."""
    from .aggregate import _Table, _vectors

    t = _Table(values, weights)
    out = {}
    for measure, (field, _) in MEASURES.items():
        if not t.has(field):
            continue
        v = _vectors(t.values[field], t.rows)
        use = t.ok[:, None] & np.isfinite(v)
        filled = np.where(use, v, 0.0)
        if t.weights is None:
            with np.errstate(invalid="ignore", divide="ignore"):
                out[measure] = filled.sum(0) / use.sum(0)
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                out[measure] = (t.weights @ filled) / (t.weights @ use.astype(np.float64))
    return out


__all__ = ["MEASURES", "RANDOMIZED", "aggregate_sanity", "average_ranks", "check_blocks_of", "hog_descriptors",
           "hog_similarity", "pearson", "sanity_check", "spearman", "ssim", "similarities"]
