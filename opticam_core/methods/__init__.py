"""Saliency methods: `explain(bundle, images, targets, method, **options)`.

The keys, families, names and options of the methods come from their registrations
(`registry.py`); `METHODS` lists them in the paper's table order.
"""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import BaseModel

from ..models import ModelBundle
from ..options import OptionsError
from ..precision import DEFAULT as DEFAULT_PRECISION
from ..precision import precision as run_in
from . import (  # noqa: F401  (each module registers its methods)
    attention,
    extremal,
    fake,
    gradient,
    gradshap,
    lime_superpixels,
    opticam,
    perturbation,
)
from .base import Context, Explanation, run_method
from .registry import FAMILIES, REGISTRY, MethodSpec, Requirement, method_spec, methods

METHODS = methods()
GRADIENT_METHODS = methods("gradient")


def method_options(key: str) -> dict[str, object]:
    """The options method `key` accepts, with their defaults (types: `method_spec(key).option_types()`)."""
    return method_spec(key).defaults()


def _check_inputs(bundle: ModelBundle, images, targets, unbounded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a B×3×H×W tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0,1], got {images.dtype} (divide uint8 images by 255)")
    if images.numel() and not torch.isfinite(images).all():
        raise ValueError("images must be finite")
    if not unbounded and images.numel() and (images.min() < -1e-6 or images.max() > 1 + 1e-6):
        raise ValueError("images must be finite and in [0,1] pixel space; the bundle normalises inside the model")
    targets = torch.as_tensor(targets, device=images.device).long().reshape(-1)
    if targets.numel() != images.shape[0]:
        raise ValueError(f"{targets.numel()} targets for {images.shape[0]} images")
    return images, targets


def _per_method_options(method: str | Sequence[str], options: dict) -> dict[str, BaseModel]:
    """key → validated options, in the order asked."""
    single = isinstance(method, str)
    keys = [method] if single else list(method)
    if len(set(keys)) != len(keys):
        raise ValueError(f"a method is listed twice: {keys}")
    specs = [method_spec(k) for k in keys]
    if not single:
        stray = sorted(set(options) - set(keys))
        if stray:
            raise ValueError(f"with a list of methods, options go per method (e.g. opticam={{...}}); "
                             f"{stray} is not among {keys}")
    validated, problems = {}, []
    for s in specs:
        try:
            validated[s.key] = s.validate(options if single else options.get(s.key))
        except OptionsError as err:
            problems += err.problems
    if problems:
        raise OptionsError(problems)
    return validated


def explain(bundle: ModelBundle, images: torch.Tensor, targets, method: str | Sequence[str], *,
            unbounded: bool = False, precision: str = DEFAULT_PRECISION, compile: bool = False, **options):
    """Saliency maps of `method` (a key, or a list of keys) for `images` and class `targets`.

    One key: options are that method's, and one `Explanation` comes back. A list: options are
    given per method (`opticam={"iterations": 50}`), the methods share their passes, and a dict
    key → Explanation comes back in the order asked. Options are validated against each method's
    typed schema first (`OptionsError` names every bad one). Maps land on the images' device.
    unbounded: accept pixels outside [0,1] (Max-Sensitivity's noisy copies, which Quantus does
    not clip); otherwise such images are refused as a likely normalisation mistake.
    precision: `fp32` (default), `tf32` (CUDA only; fp32 on a CPU) or `bf16` (the network under
    bfloat16 autocast; maps and optimiser state stay float32); compile: the network's forward
    through torch.compile. Both: `opticam_core.precision`.
    """
    per_method = _per_method_options(method, options)
    for key in per_method:
        REGISTRY[key].check_serves(bundle)
    images, targets = _check_inputs(bundle, images, targets, unbounded)
    home = images.device
    ctx = Context(bundle, images.to(bundle.device), targets.to(bundle.device))
    # Gradient methods first: their pass also yields the features and logits the others reuse.
    order = sorted(per_method, key=lambda k: REGISTRY[k].family != "gradient")
    with run_in(precision, bundle.model, compile=compile):
        results = {k: run_method(k, ctx, per_method[k]).to(home) for k in order}
    return results[method] if isinstance(method, str) else {k: results[k] for k in per_method}


__all__ = ["explain", "Explanation", "FAMILIES", "METHODS", "GRADIENT_METHODS", "MethodSpec", "Requirement", "method_options",
           "method_spec"]
