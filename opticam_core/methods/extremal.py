"""Extremal perturbation (Fong et al. 2019), TorchRay's defaults, a batch of images at once.

Placeholder: being written.
"""

from __future__ import annotations

from .base import Context, register


@register("extremal")
def extremal(ctx: Context, *, areas=(0.1,), iterations: int = 800):
    raise NotImplementedError("extremal perturbation is not implemented yet")
