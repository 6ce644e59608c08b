"""Classification metrics (SPEC §4): p and o, AD / AI / AG, and the bounding-box study.

p = softmax probability of the target class c on the image x, o = the same on x ⊙ S, the map
multiplying pixels in [0,1] space (the bundle normalises inside). Per image:

    drop = max(p − o, 0) / p        increase = 1[p < o]        gain = max(o − p, 0) / (1 − p)

A term whose denominator is 0 (p = 0 for drop, p = 1 for gain) has a zero numerator as well and
is undefined (NaN): the averages leave it out by default, as the Opti-CAM authors' code does
(nanmean), or count it as 0 with `undefined="zero"`. p and o come as float64 from float64
log-softmax, so p = 1 needs a logit gap above ~37 and is rare.
"""

from __future__ import annotations

import torch

from ..choices import check_choice
from ..cost import Cost
from ..fields import PerImage
from ._forward import class_log_probs
from .registry import Metric, MetricBatch, register_group

UNDEFINED = ("exclude", "zero")


def check_batch(bundle, images: torch.Tensor, maps: torch.Tensor | None = None, targets=None):
    """Validate and move to the bundle's device: images B×3×H×W float in [0,1], maps B×H×W."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a B×3×H×W tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0,1], got {images.dtype}")
    dev = bundle.device if bundle is not None else images.device
    images = images.to(dev)
    B, _, H, W = images.shape
    if maps is not None:
        if maps.dim() == 4 and maps.shape[1] == 1:
            maps = maps[:, 0]
        if maps.shape != (B, H, W):
            raise ValueError(f"maps must be B×H×W = {(B, H, W)} to match the images, got {tuple(maps.shape)}")
        maps = maps.to(dev, torch.float32)
    if targets is not None:
        targets = torch.as_tensor(targets, device=dev).long().reshape(-1)
        if targets.numel() != B:
            raise ValueError(f"{targets.numel()} targets for {B} images")
    return images, maps, targets


@torch.no_grad()
def clean_logits_of(bundle, images: torch.Tensor, clean_logits: torch.Tensor | None = None) -> torch.Tensor:
    if clean_logits is not None:
        if clean_logits.shape[0] != images.shape[0]:
            raise ValueError(f"clean_logits has {clean_logits.shape[0]} rows for {images.shape[0]} images")
        return clean_logits.to(images.device)
    return bundle.model(images)


@torch.no_grad()
def confidence(bundle, images: torch.Tensor, maps: torch.Tensor, targets, *,
               clean_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, o): float64 probabilities of `targets` on x and on x ⊙ S, each of length B.

    clean_logits: the logits of the clean images when the caller has them (saves a forward).
    """
    home = images.device
    images, maps, targets = check_batch(bundle, images, maps, targets)
    logits = clean_logits_of(bundle, images, clean_logits)
    p = class_log_probs(logits, targets).exp()
    o = class_log_probs(bundle.model(images * maps[:, None]), targets).exp()
    return p.to(home), o.to(home)


# ---------------------------------------------------------------------------------------------
# Per-image terms and their averages


def _pair(p, o) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(p, dtype=torch.float64)
    o = torch.as_tensor(o, dtype=torch.float64, device=p.device)
    return p, o


def drop_terms(p, o) -> torch.Tensor:
    """max(p − o, 0) / p per image; NaN where p = 0."""
    p, o = _pair(p, o)
    return torch.where(p > 0, (p - o).clamp_min(0) / torch.where(p > 0, p, 1.0), float("nan"))


def increase_terms(p, o) -> torch.Tensor:
    """1[p < o] per image (float64; NaN where p or o is NaN)."""
    p, o = _pair(p, o)
    return torch.where(torch.isnan(p) | torch.isnan(o), float("nan"), (p < o).double())


def gain_terms(p, o) -> torch.Tensor:
    """max(o − p, 0) / (1 − p) per image; NaN where p = 1."""
    p, o = _pair(p, o)
    q = 1 - p
    return torch.where(q > 0, (o - p).clamp_min(0) / torch.where(q > 0, q, 1.0), float("nan"))


def mean_percent(terms: torch.Tensor, undefined: str = "exclude") -> tuple[float, int]:
    """(100 · mean of the terms, images used). NaN terms: left out, or counted as 0."""
    check_choice("undefined", undefined, UNDEFINED)
    terms = torch.as_tensor(terms, dtype=torch.float64).reshape(-1)
    if undefined == "zero":
        terms = torch.nan_to_num(terms, nan=0.0)
    ok = ~torch.isnan(terms)
    n = int(ok.sum())
    return (100.0 * float(terms[ok].mean()) if n else float("nan")), n


def average_drop(p, o, *, undefined: str = "exclude") -> float:
    """AD in percent: 100/N · Σ max(p − o, 0)/p."""
    return mean_percent(drop_terms(p, o), undefined)[0]


def average_increase(p, o) -> float:
    """AI in percent: 100/N · Σ 1[p < o]."""
    return mean_percent(increase_terms(p, o))[0]


def average_gain(p, o, *, undefined: str = "exclude") -> float:
    """AG in percent: 100/N · Σ max(o − p, 0)/(1 − p)."""
    return mean_percent(gain_terms(p, o), undefined)[0]


# ---------------------------------------------------------------------------------------------
# The group: o per image; AD, AG, AI from p and o in `aggregate`


@register_group("classification", cost=Cost(forwards=1),  # x ⊙ S; the clean forward is shared
                fields=(PerImage("o", "float64", "softmax probability of c on x ⊙ S"),),
                metrics=(Metric("AD", "average drop", higher_is_better=False),
                         Metric("AG", "average gain", higher_is_better=True),
                         Metric("AI", "average increase", higher_is_better=True)))
def _classification(batch: MetricBatch) -> dict[str, torch.Tensor]:
    return {"o": class_log_probs(batch.bundle.model(batch.images * batch.maps[:, None]), batch.targets).exp()}
