"""Selectivity (the paper's Fig. A4): AD / AG / AI of the map raised element-wise to α.

S ↦ S^α sharpens the map (α > 1: only the strongest pixels survive the masking) or flattens it
(α < 1: every non-zero pixel tends to 1, so x ⊙ S^α tends to x where S > 0). Per image and α the
group stores o_α, the softmax probability of the target class c (the label) on x ⊙ S^α;
`aggregate_selectivity` makes AD / AG / AI per α of them and p with exactly the classification
rules of `aggregate` (at α = 1 the numbers are the classification group's).

0^α = 0 for every α > 0, so a zero of the map stays a zero; α ≤ 0 is refused (0^0 = 1 and 0^α for
α < 0 is infinite: not a mask).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from ..choices import check_choice
from ..cost import Cost
from ..fields import PerImage
from ..options import ListOf, OptionsError, PositiveFloat, PositiveInt
from ._forward import chunked_log_probs, resolve_batch_size
from .aggregate import Aggregate, _classification, _Table, _vectors
from .classification import check_batch
from .registry import MetricBatch, register_group

ALPHAS = (0.01, 0.05, 0.1, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


@torch.no_grad()
def selectivity(bundle, images: torch.Tensor, maps: torch.Tensor, targets, *,
                alphas: ListOf(PositiveFloat) = ALPHAS,
                batch_size: PositiveInt | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas A float64, o B×A float64): the probability of `targets` on x ⊙ S^α for each α.

    All B·A masked images go through the network together, `batch_size` at a time (default 8 on
    a CPU; on a GPU what its free memory holds), α-major: with batch_size = B each forward is one α's batch, the same
    forward as the classification group's at α = 1."""
    home = images.device
    alpha = torch.as_tensor(tuple(alphas), dtype=torch.float64).reshape(-1)
    if alpha.numel() == 0 or not bool((alpha > 0).all()) or not bool(torch.isfinite(alpha).all()):
        raise OptionsError([f"metrics.selectivity.alphas: every α must be a finite number > 0, got {list(alphas)}"])
    images, maps, targets = check_batch(bundle, images, maps, targets)
    dev = images.device
    B, A = images.shape[0], alpha.numel()
    powers = alpha.tolist()

    def build(part: slice):
        job = torch.arange(part.start, part.stop, device=dev)
        which, img = job // B, job % B
        masks = maps[img]
        for a in which.unique().tolist():  # S^1 is S itself, bit for bit (no pow's rounding)
            if powers[a] != 1.0:
                masks[which == a] = masks[which == a].pow(powers[a])
        return images[img] * masks[:, None], targets[img]

    bs = resolve_batch_size(batch_size, dev, model=bundle.model, example=images, copies=2.5, total=A * B)
    o = chunked_log_probs(bundle.model, A * B, build, bs, dev).exp()
    return alpha.to(home), o.view(A, B).T.contiguous().to(home)


@register_group(
    "selectivity", options_from=selectivity, cost=lambda o: Cost(forwards=len(o.alphas)),  # x ⊙ S^α per α
    fields=(PerImage("selectivity_alpha", "list<float32>", "the exponents α of S^α (Fig. A4)"),
            PerImage("selectivity_o", "list<float32>", "softmax probability of c on x ⊙ S^α, per α")),
    metrics=())
def _selectivity(batch: MetricBatch, **options) -> dict[str, torch.Tensor]:
    alpha, o = selectivity(batch.bundle, batch.images, batch.maps, batch.targets, **options)
    # float32, the rows' type: o at α = 1 is the classification group's o rounded to float32
    # (`selectivity` itself returns it in float64, bit for bit)
    return {"selectivity_alpha": alpha.float()[None].expand(len(o), -1).to(o.device), "selectivity_o": o.float()}


def _key(a: float) -> float:
    """α as stored (float32) → the number it was written as (0.01, not 0.009999999776)."""
    return float(str(np.float32(a)))


def aggregate_selectivity(values: Mapping[str, Sequence], *, undefined: str = "exclude",
                          weights=None) -> dict[float, dict[str, Aggregate]]:
    """{α: {"AD", "AG", "AI": Aggregate}} from rows with p, selectivity_alpha and selectivity_o
    (and optionally `error`), in increasing α: the classification rules of `aggregate` with o
    replaced by o_α (rows without that α, or whose vectors differ in length from the longest, are
    left out of it). `weights` (R×N): bootstrap resamples, as in `aggregate`. No selectivity
    columns: {}."""
    check_choice("undefined", undefined, ("exclude", "zero"))
    if not all(k in values for k in ("p", "selectivity_alpha", "selectivity_o")):
        return {}
    rows = len(values["p"])
    alphas = _vectors(values["selectivity_alpha"], rows).astype(np.float32)
    o = _vectors(values["selectivity_o"], rows)
    if alphas.shape != o.shape:
        raise ValueError(f"selectivity_alpha and selectivity_o differ in shape: {alphas.shape} vs {o.shape}")
    table = {"p": values["p"]}
    if "error" in values:
        table["error"] = values["error"]
    out: dict[float, dict[str, Aggregate]] = {}
    for a in np.unique(alphas[np.isfinite(alphas)]):
        r, c = np.nonzero(alphas == a)
        o_a = np.full(rows, math.nan)
        o_a[r] = o[r, c]
        out[_key(a)] = _classification(_Table({**table, "o_alpha": o_a}, weights), "o_alpha", undefined)
    return out


__all__ = ["ALPHAS", "aggregate_selectivity", "selectivity"]
