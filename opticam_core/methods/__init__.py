"""Saliency methods: `explain(bundle, images, targets, method, **options)`.

Keys (SPEC §2): fakecam, gradcam, gradcampp, xgradcam, layercam, hirescam, scorecam,
ablationcam, extremal, opticam.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..choices import check_choice
from ..models import ModelBundle
from . import extremal, fake, gradient, opticam, perturbation  # noqa: F401  (registration)
from .base import REGISTRY, Context, Explanation, method_options, run_method
from .gradient import GRADIENT_METHODS

METHODS = ("fakecam", "gradcam", "gradcampp", "xgradcam", "layercam", "hirescam",
           "scorecam", "ablationcam", "extremal", "opticam")
assert set(METHODS) == set(REGISTRY), "every method key must be registered"


def check_options(key: str, options: dict) -> dict:
    check_choice("method", key, METHODS)
    valid = method_options(key)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {key!r}; valid: {sorted(valid) or 'none'}")
    return dict(options)


def _check_inputs(bundle: ModelBundle, images, targets) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a B×3×H×W tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0,1], got {images.dtype} (divide uint8 images by 255)")
    if images.numel() and (not torch.isfinite(images).all() or images.min() < -1e-6 or images.max() > 1 + 1e-6):
        raise ValueError("images must be finite and in [0,1] pixel space; the bundle normalises inside the model")
    targets = torch.as_tensor(targets, device=images.device).long().reshape(-1)
    if targets.numel() != images.shape[0]:
        raise ValueError(f"{targets.numel()} targets for {images.shape[0]} images")
    return images, targets


def explain(bundle: ModelBundle, images: torch.Tensor, targets, method: str | Sequence[str], **options):
    """Saliency maps of `method` (a key, or a list of keys) for `images` and class `targets`.

    One key: options are that method's, and one `Explanation` comes back. A list: options are
    given per method (`opticam={"iterations": 50}`), the methods share their passes, and a dict
    key → Explanation comes back in the order asked. Maps land on the images' device.
    """
    single = isinstance(method, str)
    keys = [method] if single else list(method)
    if len(set(keys)) != len(keys):
        raise ValueError(f"a method is listed twice: {keys}")
    if single:
        per_method = {method: check_options(method, options)}
    else:
        stray = sorted(set(options) - set(keys))
        if stray:
            raise ValueError(f"with a list of methods, options go per method (e.g. opticam={{...}}); "
                             f"{stray} is not among {keys}")
        per_method = {k: check_options(k, options.get(k) or {}) for k in keys}

    images, targets = _check_inputs(bundle, images, targets)
    home = images.device
    ctx = Context(bundle, images.to(bundle.device), targets.to(bundle.device))
    # Gradient methods first: their pass also yields the features and logits the others reuse.
    order = sorted(keys, key=lambda k: k not in GRADIENT_METHODS)
    results = {k: run_method(k, ctx, per_method[k]).to(home) for k in order}
    return results[method] if single else {k: results[k] for k in keys}


__all__ = ["explain", "Explanation", "METHODS", "GRADIENT_METHODS", "method_options"]
